"""RolloutPool scheduling, staleness bound, retries and failure reporting; a scored group's wire form.

Driven by ScriptedBackend (a test double with controlled delays and faults); scoring is the real
`medvl_engine.rewards.score_samples`.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest
from scripted_backend import ScriptedBackend

from medvl_engine.data import Sample
from medvl_engine.rollout.groups import FailedPrompt, ScoredGroup, to_message
from medvl_engine.rollout.pool import RolloutPool
from medvl_engine.rollout.types import PromptRequest, SamplingParams
from medvl_engine.transport.messages import RolloutGroup, decode, encode

PARAMS = SamplingParams(n=4, temperature=1.0, max_new_tokens=16)


def make_requests(count: int, start: int = 0) -> list[PromptRequest]:
    requests = []
    for i in range(start, start + count):
        sample = Sample(images=[], question=f"question {i}?", options={"A": "yes", "B": "no"},
                        answer_label="AB"[i % 2], answer=["yes", "no"][i % 2], dataset_name="unit", dataset_index=i)
        requests.append(PromptRequest(f"p{i}", input_ids=[1, 2, 3, i], text=f"question {i}?", sample=sample))
    return requests


async def collect(pool: RolloutPool, limit: int | None = None) -> list:
    return [item async for item in pool.stream(limit=limit)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def test_every_prompt_once_scored_and_bounded_per_backend():
    backends = [ScriptedBackend("a", delay=0.01), ScriptedBackend("b", delay=0.01)]
    pool = RolloutPool(backends, make_requests(12), PARAMS, max_in_flight=2)
    items = run(collect(pool))
    assert sorted(i.request.prompt_id for i in items) == sorted(f"p{i}" for i in range(12))
    assert all(isinstance(i, ScoredGroup) and i.n == 4 for i in items)
    # correct_answer answers the right letter in the right format: reward 1 everywhere.
    assert all(np.array_equal(i.rewards, np.ones(4, np.float32)) and i.correct.all() and i.format_ok.all()
               for i in items)
    assert [b.max_active for b in backends] == [2, 2]
    assert pool.stats.groups_emitted == 12 and pool.stats.prompts_started == 12 and pool.stats.failed == 0
    assert pool.stats.tokens_generated == sum(i.num_tokens for i in items)


def test_group_is_emitted_when_its_answers_are_in_not_in_submission_order():
    backend = ScriptedBackend("a", delays={"p0": 0.3, "p1": 0.0, "p2": 0.05})
    items = run(collect(RolloutPool([backend], make_requests(3), PARAMS, max_in_flight=3)))
    assert [i.request.prompt_id for i in items] == ["p1", "p2", "p0"]


def test_least_loaded_backend_gets_the_work():
    # "b" answers 10x faster, so its slots free up first and it takes most prompts.
    slow, fast = ScriptedBackend("slow", delay=0.1), ScriptedBackend("fast", delay=0.01)
    run(collect(RolloutPool([slow, fast], make_requests(20), PARAMS, max_in_flight=1)))
    assert len(fast.calls) > 3 * len(slow.calls)
    assert len(slow.calls) + len(fast.calls) == 20


def test_first_starts_alternate_between_idle_backends():
    backends = [ScriptedBackend(name, delay=0.05) for name in "abc"]
    run(collect(RolloutPool(backends, make_requests(6), PARAMS, max_in_flight=2)))
    assert [len(b.calls) for b in backends] == [2, 2, 2]


def test_limit_stops_pulling_prompts():
    requests = iter(make_requests(100))
    items = run(collect(RolloutPool([ScriptedBackend("a")], requests, PARAMS, max_in_flight=4), limit=5))
    assert len(items) == 5
    # The pool never starts more groups than it still needs: 95 prompts are left for the next stream.
    assert len(list(requests)) == 95


def test_failing_call_is_retried_on_another_backend():
    flaky = ScriptedBackend("flaky", faults={"p0": ["raise"]})
    healthy = ScriptedBackend("healthy", delay=0.02)
    pool = RolloutPool([flaky, healthy], make_requests(1), PARAMS, max_in_flight=1, retries=2)
    items = run(collect(pool))
    assert len(items) == 1 and isinstance(items[0], ScoredGroup) and items[0].attempts == 2
    assert [c.outcome for c in flaky.calls] == ["raised"] and [c.outcome for c in healthy.calls] == ["ok"]
    assert pool.stats.retried_attempts == 1 and pool.stats.failed == 0


def test_prompt_failing_every_attempt_is_reported_never_dropped():
    backend = ScriptedBackend("a", faults={"p1": ["raise", "raise", "raise"]})
    pool = RolloutPool([backend], make_requests(3), PARAMS, max_in_flight=2, retries=2)
    items = run(collect(pool))
    failed = [i for i in items if isinstance(i, FailedPrompt)]
    assert len(failed) == 1 and failed[0].request.prompt_id == "p1"
    assert failed[0].attempts == 3 and len(failed[0].errors) == 3
    assert "ConnectionError" in failed[0].reason and "scripted fault" in failed[0].reason
    assert sorted(i.request.prompt_id for i in items) == ["p0", "p1", "p2"]
    assert backend.attempts["p1"] == 3
    assert pool.stats.failed == 1 and pool.stats.groups_emitted == 2


def test_timeout_then_success_is_scored_once():
    backend = ScriptedBackend("a", faults={"p0": ["hang", None]})
    pool = RolloutPool([backend], make_requests(2), PARAMS, max_in_flight=2, retries=1, timeout_s=0.1)
    items = run(collect(pool))
    assert Counter(i.request.prompt_id for i in items) == {"p0": 1, "p1": 1}
    assert [c.outcome for c in backend.calls if c.prompt_id == "p0"] == ["cancelled", "ok"]
    group = next(i for i in items if i.request.prompt_id == "p0")
    assert group.attempts == 2
    assert pool.stats.tokens_generated == sum(i.num_tokens for i in items)


def test_timeouts_exhausting_retries_report_the_timeout():
    backend = ScriptedBackend("a", faults={"p0": ["hang", "hang"]})
    items = run(collect(RolloutPool([backend], make_requests(1), PARAMS, retries=1, timeout_s=0.05)))
    assert len(items) == 1 and isinstance(items[0], FailedPrompt)
    assert "timed out after 0.05 s" in items[0].reason and items[0].attempts == 2


def test_wrong_number_of_answers_counts_as_a_failure():
    items = run(collect(RolloutPool([ScriptedBackend("a", wrong_count=True)], make_requests(1), PARAMS, retries=0)))
    assert isinstance(items[0], FailedPrompt) and "expected n=4" in items[0].reason


def test_staleness_bound_waits_for_new_weights():
    backend = ScriptedBackend("a", delay=0.01, version=0)

    async def scenario():
        pool = RolloutPool([backend], make_requests(6), PARAMS, max_in_flight=2, max_staleness=1)
        pool.set_consumer_version(2)  # the learner is 2 versions ahead: nothing may start
        items = []

        async def consume():
            async for item in pool.stream():
                items.append(item)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        assert backend.calls == [] and pool.stats.staleness_waits > 0
        await backend.update_weights_from_tensors([], version=1)  # 2 - 1 <= 1: allowed again
        await asyncio.wait_for(task, 5)
        return items

    items = run(scenario())
    assert len(items) == 6 and all(i.weight_version == 1 for i in items)
    assert all(c.version == 1 for c in backend.calls)


def test_staleness_counts_the_oldest_group_in_flight():
    # p0 runs long on version 0; meanwhile the learner and the backend move to version 1. With k=0
    # nothing new may start while p0 (1 version behind) is unconsumed, although a slot is free.
    backend = ScriptedBackend("a", delays={"p0": 0.3}, delay=0.01, version=0)
    pool = RolloutPool([backend], make_requests(4), PARAMS, max_in_flight=2, max_staleness=0)

    async def scenario():
        items = []

        async def consume():
            async for item in pool.stream():
                items.append(item)

        task = asyncio.create_task(consume())
        while len(backend.calls) < 2:
            await asyncio.sleep(0.005)
        backend.version = 1
        pool.set_consumer_version(1)
        await asyncio.wait_for(task, 5)
        return items

    items = run(scenario())
    assert sorted(i.request.prompt_id for i in items) == ["p0", "p1", "p2", "p3"]
    p0, p1 = backend.calls[:2]
    assert (p0.prompt_id, p0.version, p1.version) == ("p0", 0, 0)
    later = backend.calls[2:]
    assert [c.version for c in later] == [1, 1]
    assert all(c.started >= p0.ended for c in later)


def test_stopping_early_cancels_in_flight_groups():
    backend = ScriptedBackend("a", delays={"p0": 0.0}, delay=0.5)

    async def scenario():
        pool = RolloutPool([backend], make_requests(4), PARAMS, max_in_flight=4)
        async for item in pool.stream():
            assert item.request.prompt_id == "p0"
            break
        await asyncio.sleep(0)
        return pool

    run(scenario())
    assert sorted(c.outcome for c in backend.calls) == ["cancelled", "cancelled", "cancelled", "ok"]


def test_to_message_round_trips_through_the_wire_format():
    items = run(collect(RolloutPool([ScriptedBackend("a")], make_requests(2), PARAMS)))
    group = items[0]
    message = decode(encode(to_message(group, producer="w0", seq=7)))
    assert isinstance(message, RolloutGroup)
    assert message.seq == 7 and message.producer == "w0" and message.prompt_id == group.request.prompt_id
    assert message.dataset_name == "unit" and message.dataset_index == group.request.sample.dataset_index
    assert message.prompt_array().tolist() == group.request.input_ids
    for k, completion in enumerate(group.completions):
        assert np.array_equal(message.response_array(k), completion.token_ids)
        assert np.array_equal(message.logprob_array(k), completion.logprobs)
    assert np.array_equal(message.reward_array(), group.rewards)
    assert message.letters == group.letters and message.texts == [c.text for c in group.completions]
    assert message.parsed == group.parsed and len(message.parsed) == group.n
    assert message.position == group.request.position
    text_only = PromptRequest("t", text="no ids", sample=group.request.sample)
    with pytest.raises(ValueError, match="no input_ids"):
        to_message(ScoredGroup(text_only, group.completions, group.rewards, group.correct, group.format_ok,
                               group.letters, group.parsed, 0), "w0", 0)


def test_bad_arguments_are_named():
    backend = ScriptedBackend("a")
    with pytest.raises(ValueError, match="no backends"):
        RolloutPool([], [], PARAMS)
    with pytest.raises(ValueError, match="max_in_flight"):
        RolloutPool([backend], [], PARAMS, max_in_flight=0)
    with pytest.raises(ValueError, match="unknown mode"):
        RolloutPool([backend], [], PARAMS, score_mode="nope")
    with pytest.raises(ValueError, match="timeout_s"):
        RolloutPool([backend], [], PARAMS, timeout_s=0)
