"""The channel across real processes on loopback: every message arrives once, in order, byte for byte,
through producer crashes (kill -9 and restart), a hostile peer sending garbage alongside, and a slow
consumer whose credits bound what is in flight."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from transport_producer import make_message

from medvl_engine.transport.receiver import GroupReceiver

PRODUCER_SCRIPT = Path(__file__).with_name("transport_producer.py")


class Producers:
    """Producer processes started by a test; every one still running is killed at the end."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.procs: dict[str, subprocess.Popen] = {}
        self.finished: list[tuple[str, list[dict]]] = []

    def start(self, name: str, total: int, *extra: str) -> None:
        self.procs[name] = subprocess.Popen(
            [sys.executable, str(PRODUCER_SCRIPT), self.endpoint, name, str(total), *extra],
            stdout=subprocess.PIPE, text=True)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()

    def wait_all(self) -> dict[str, dict]:
        """Each producer's last report (its sender's stats), after a clean exit."""
        reports = {}
        for name, proc in list(self.procs.items()):
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"producer {name} exited with {proc.returncode}"
            lines = [json.loads(line) for line in out.splitlines()]
            reports[name] = lines[-1]
            self.procs.pop(name)
        return reports

    def cleanup(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()


@pytest.fixture
def producers():
    made = []

    def make(endpoint: str) -> Producers:
        made.append(Producers(endpoint))
        return made[-1]

    yield make
    for group in made:
        group.cleanup()


def check_stream(received: dict[str, list], totals: dict[str, int]) -> None:
    """Every position of every producer once, in order, equal to what the producer generated."""
    for name, total in totals.items():
        seqs = [msg.seq for msg in received[name]]
        assert seqs == list(range(total)), f"producer {name}: positions out of order, missing or repeated"
        for msg in received[name]:
            assert msg == make_message(name, msg.seq), f"producer {name} seq {msg.seq}: content differs"


def test_ten_thousand_groups_from_two_producers(endpoint, producers):
    totals = {"worker-0": 5000, "worker-1": 5000}
    with GroupReceiver(endpoint, credits=32, insecure=True) as receiver:
        procs = producers(receiver.endpoint)
        for name, total in totals.items():
            procs.start(name, total)
        received = defaultdict(list)
        for _ in range(sum(totals.values())):
            msg = receiver.recv(timeout=30)
            received[msg.producer].append(msg)
        reports = procs.wait_all()
        with pytest.raises(TimeoutError):
            receiver.recv(timeout=0.2)
        stats = receiver.stats
    check_stream(received, totals)
    assert stats.received == stats.delivered == 10_000
    assert stats.duplicates == 0 and stats.lost == 0
    for name in totals:
        assert reports[name]["max_outstanding"] <= 32
        assert stats.producers[name].max_buffered <= 32


def test_producer_killed_and_restarted_mid_stream(endpoint, producers):
    totals = {"worker-0": 6000, "worker-1": 4000}
    rng = random.Random(4)
    kill_at = sorted(rng.sample(range(500, 5500), 3))  # after this many messages of worker-0 arrived
    credits = 64
    resumed = []
    with GroupReceiver(endpoint, credits=credits, insecure=True) as receiver:
        procs = producers(receiver.endpoint)
        for name, total in totals.items():
            procs.start(name, total)
        received = defaultdict(list)
        for _ in range(sum(totals.values())):
            msg = receiver.recv(timeout=30)
            received[msg.producer].append(msg)
            if msg.producer == "worker-0" and kill_at and len(received["worker-0"]) == kill_at[0]:
                race = len(kill_at) == 2
                if race:
                    time.sleep(0.3)  # the producer fills its window: messages on the wire when it dies
                kill_at.pop(0)
                procs.kill("worker-0")
                procs.start("worker-0", totals["worker-0"])
                if race:
                    # the new Hello arrives while the dead process's messages are still unread, so the
                    # new process resumes before them and sends their positions again
                    time.sleep(1.5)
                resumed.append(len(received["worker-0"]))
        reports = procs.wait_all()
        stats = receiver.stats
    check_stream(received, totals)
    assert stats.delivered == 10_000 and stats.lost == 0
    worker = stats.producers["worker-0"]
    assert worker.sessions == 4
    assert worker.duplicates > 0, "the restart race was not exercised"
    # The last process resumed where the receiver stood at its Hello: at or past what had been consumed
    # when its predecessor died, and within one window of it (nothing regenerated from scratch).
    assert resumed[-1] <= reports["worker-0"]["resumed_from"] <= resumed[-1] + credits
    assert stats.producers["worker-1"].duplicates == 0


def test_slow_consumer_is_bounded_by_its_credits(producers):
    credits = 4
    total = 120
    with GroupReceiver("tcp://127.0.0.1:*", credits=credits, insecure=True) as receiver:
        procs = producers(receiver.endpoint)
        procs.start("worker-0", total)
        received = defaultdict(list)
        for i in range(total):
            msg = receiver.recv(timeout=30)
            received[msg.producer].append(msg)
            if i in (10, 60):
                time.sleep(0.3)  # long enough for an unbounded producer to send all it has left
            elif i % 3 == 0:
                time.sleep(0.002)
        report = procs.wait_all()["worker-0"]
        stats = receiver.stats.producers["worker-0"]
    check_stream(received, {"worker-0": total})
    # The receiver held a full window after each pause, never more; the producer never had more out.
    assert stats.max_buffered == credits
    assert report["max_outstanding"] == credits
    assert report["credit_waits"] > 0


def test_a_garbage_sender_alongside_two_producers(endpoint, producers, settle):
    """(Once the first undecodable frame raised out of recv and ended the learner's run.)"""
    totals = {"worker-0": 1500, "worker-1": 1500}
    with GroupReceiver(endpoint, credits=32, insecure=True) as receiver:
        procs = producers(receiver.endpoint)
        procs.start("garbage", 3000, "--garbage")
        for name, total in totals.items():
            procs.start(name, total)
        received = defaultdict(list)
        for _ in range(sum(totals.values())):
            msg = receiver.recv(timeout=30)
            received[msg.producer].append(msg)
        # The rest of the garbage is read (and dropped) while the hostile process finishes sending it.
        settle(receiver, lambda stats: procs.procs["garbage"].poll() is not None, timeout=60)
        reports = procs.wait_all()
        sent = reports["garbage"]
        settle(receiver, lambda stats: sum(stats.dropped.values()) >= sum(sent.values()))
        with pytest.raises(TimeoutError):
            receiver.recv(timeout=0.2)
        stats = receiver.stats
    check_stream(received, totals)
    assert set(received) == set(totals)
    assert stats.delivered == 3000 and stats.duplicates == 0 and stats.lost == 0
    # Every garbage frame is dropped for what it is (the stranger's claims on worker-0 before any Hello, the
    # impostor's on worker-1 as another producer) and counted once.
    assert sum(stats.dropped.values()) == sum(sent.values())
    assert stats.dropped["no_hello"] == sent["stranger's claim"]
    assert stats.dropped["wrong_producer"] == sent["impostor's claim"]
    assert stats.dropped["over_credit"] == sent["past its credit"]
    assert stats.dropped["multipart"] == sent["multipart"]
