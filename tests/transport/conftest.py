"""Fixtures of the transport tests: both link kinds, and no CURVE key folder leaking in from the shell."""

from __future__ import annotations

import tempfile
import threading
import time

import pytest

from medvl_engine.transport.keys import KEYS_ENV


@pytest.fixture(autouse=True)
def no_keys_from_the_environment(monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request):
    """A bind address on loopback tcp or on an ipc socket of its own."""
    if request.param == "tcp":
        yield "tcp://127.0.0.1:*"
        return
    # ipc paths are limited to ~107 bytes, more than pytest's tmp_path can promise
    with tempfile.TemporaryDirectory(prefix="medvl-") as folder:
        yield f"ipc://{folder}/groups.sock"


@pytest.fixture
def closing():
    """`keep(thing)` returns `thing` and closes it (a thread: joins it) at teardown, last kept first, also
    when the test fails: a socket left open for the garbage collector can hang the interpreter, since
    terminating a ZeroMQ context waits for its sockets."""
    things = []

    def keep(thing):
        things.append(thing)
        return thing

    yield keep
    for thing in reversed(things):
        if isinstance(thing, threading.Thread):
            thing.join(15)
        else:
            thing.close()


@pytest.fixture
def settle():
    """`settle(receiver, done)` lets the receiver read, with nothing left to deliver, until `done(stats)`:
    frames of different connections arrive in no fixed order, so a stranger's frame may come after the
    stream it was sent beside."""

    def run(receiver, done, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done(receiver.stats):
            assert time.monotonic() < deadline, f"not settled within {timeout} s: dropped {receiver.stats.dropped}"
            with pytest.raises(TimeoutError):
                receiver.recv(timeout=0.05)

    return run
