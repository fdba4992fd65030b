"""OrderedSource draws a bounded number of prompts per step: when every group is dropped (all answers score
the same, or every prompt fails) it stops with a message that says why instead of drawing forever."""

from __future__ import annotations

import pytest

from medvl_engine.errors import UserError
from medvl_engine.trainers.sources import OrderedSource
from medvl_engine.transport.messages import RolloutError, RolloutGroup


def _group(position: int, rewards: list[float]) -> RolloutGroup:
    n = len(rewards)
    return RolloutGroup.build(
        producer="fake", seq=position, prompt_id=f"q{position}", dataset_name="unit", dataset_index=position,
        weight_version=0, answer_label="A", prompt_ids=[1, 2, 3], response_ids=[[4, 5]] * n,
        logprobs=[[-0.5, -0.5]] * n, texts=["<answer>A</answer>"] * n, finish_reasons=["stop"] * n,
        rewards=rewards, correct=[r > 0 for r in rewards], format_ok=[True] * n, letters=["A"] * n,
        position=position)


class FakeFeed:
    """Produces stream positions 0, 1, 2, ... on demand, each made by `make(position)`; counts them."""

    def __init__(self, make):
        self.make = make
        self.next_position = 0

    def seek(self, position: int) -> None:
        self.next_position = position

    def announce(self, update) -> None:
        pass

    def recv(self, timeout: float | None = None):
        msg = self.make(self.next_position)
        self.next_position += 1
        return msg

    def check(self) -> None:
        pass


def _source(feed, dynamic_sampling=True, **kwargs) -> OrderedSource:
    return OrderedSource(feed, rank=0, prompts_per_step=4, max_staleness=0, dynamic_sampling=dynamic_sampling,
                         **kwargs)


def test_groups_that_all_score_the_same_stop_the_run_with_the_reason():
    feed = FakeFeed(lambda position: _group(position, [1.0, 1.0, 1.0, 1.0]))
    source = _source(feed, max_draw_factor=3)
    with pytest.raises(UserError) as err:
        source.next(4, version=0)
    message = str(err.value)
    assert feed.next_position == 12  # 3 x 4 prompts drawn, then it stopped
    assert "needs 4 groups and drew 12 prompts (algo.max_draw_factor 3 x 4)" in message
    assert "kept 0" in message and "12 had answers that all scored the same" in message
    assert "rollout.dynamic_sampling" in message


def test_prompts_that_all_fail_stop_the_run_naming_the_last_failure():
    def failing(position):
        return RolloutError(producer="fake", seq=position, prompt_id=f"q{position}", reason="image cannot be decoded",
                            attempts=0, position=position)

    source = _source(FakeFeed(failing), dynamic_sampling=False, max_draw_factor=2)
    with pytest.raises(UserError, match=r"kept 0: 8 failed \(last: q7: image cannot be decoded\)"):
        source.next(4, version=0)


def test_a_step_with_enough_useful_groups_within_the_bound_goes_on():
    # Three of every four groups are constant: 4 useful groups need 16 draws, within 8 x 4.
    feed = FakeFeed(lambda position: _group(position, [1.0, 0.0] if position % 4 == 3 else [0.0, 0.0]))
    source = _source(feed)
    groups = source.next(4, version=0)
    assert [g.position for g in groups] == [3, 7, 11, 15]
    assert source.stats.constant == 12 and source.position == 16
    # The bound is per step: the next step draws afresh.
    assert [g.position for g in source.next(4, version=0)] == [19, 23, 27, 31]
