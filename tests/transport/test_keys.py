"""CURVE on tcp: `medvl-engine keys` writes the key folder, a receiver with keys admits only senders that hold
the run's keys, an endpoint other hosts can reach refuses to start without keys, and missing key files
say what to do. (Once every tcp endpoint ran ZeroMQ's NULL mechanism: anyone who reached the port was in.)"""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from medvl_engine import cli
from medvl_engine.transport.keys import KEYS_ENV, create_keys, reachable_from_other_hosts
from medvl_engine.transport.messages import RolloutError
from medvl_engine.transport.protocol import TransportError
from medvl_engine.transport.receiver import GroupReceiver
from medvl_engine.transport.sender import GroupSender


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "keys"
    assert cli.main(["keys", str(folder)]) == 0
    return folder


def error(seq: int = -1) -> RolloutError:
    return RolloutError(producer="", seq=seq, prompt_id="q", reason="timeout")


def handshake(receiver: GroupReceiver, sender: GroupSender) -> int:
    """The receiver answers a Hello only while it reads: alternate until the sender has its Credit."""
    for _ in range(100):
        with pytest.raises(TimeoutError):
            receiver.recv(timeout=0.05)
        try:
            return sender.handshake(timeout=0.05)
        except TimeoutError:
            pass
    raise AssertionError("no handshake within 10 s")


def test_the_keys_command_writes_owner_only_key_pairs(keys, capsys):
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in keys.iterdir()}
    assert modes == {"server.key": 0o644, "server.key_secret": 0o600, "client.key": 0o644,
                     "client.key_secret": 0o600}
    before = (keys / "server.key_secret").read_bytes()
    assert cli.main(["keys", str(keys)]) == 2  # every node must share one set: never replaced silently
    assert "already holds" in capsys.readouterr().err and (keys / "server.key_secret").read_bytes() == before


def test_a_sender_with_the_run_keys_gets_through(keys, closing):
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, keys=keys) as receiver:
        sender = closing(GroupSender(receiver.endpoint, "w0", keys=keys, linger_s=0))
        assert handshake(receiver, sender) == 0
        sender.send(error(), timeout=5)
        assert receiver.recv(timeout=10).producer == "w0"


def test_a_sender_without_keys_is_refused(keys, closing):
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, keys=keys) as receiver:
        sender = closing(GroupSender(receiver.endpoint, "w0", linger_s=0))  # loopback, no keys: no CURVE
        with pytest.raises(TransportError, match="has no CURVE keys and the receiver asks for them"):
            sender.handshake(timeout=10)
        with pytest.raises(TimeoutError):
            receiver.recv(timeout=0.3)
        assert receiver.stats.producers == {}


def test_a_sender_with_another_runs_keys_is_refused(keys, tmp_path, closing):
    other = tmp_path / "other"
    create_keys(other)
    shutil.copy(keys / "server.key", other / "server.key")  # knows the server, but not the client secret
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, keys=keys) as receiver:
        sender = closing(GroupSender(receiver.endpoint, "w0", keys=other, linger_s=0))
        with pytest.raises(TimeoutError):
            receiver.recv(timeout=0.3)  # nothing gets through
        with pytest.raises(TransportError, match="refused this producer's CURVE key"):
            sender.handshake(timeout=10)
        assert receiver.stats.dropped.get("unknown_key", 0) >= 1 and receiver.stats.producers == {}


def test_a_sender_with_the_wrong_server_key_never_connects(keys, tmp_path, closing):
    other = tmp_path / "other"
    create_keys(other)
    for name in ("client.key", "client.key_secret"):
        shutil.copy(keys / name, other / name)  # the right client pair, another server's public key
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, keys=keys) as receiver:
        sender = closing(GroupSender(receiver.endpoint, "w0", keys=other, linger_s=0))
        with pytest.raises(TimeoutError):
            receiver.recv(timeout=0.5)
        with pytest.raises(TimeoutError, match="is server.key the receiver's"):
            sender.handshake(timeout=0.5)
        assert receiver.stats.producers == {}


def test_other_hosts_reach_only_with_keys(keys, monkeypatch, closing):
    with pytest.raises(ValueError, match=r"tcp://0\.0\.0\.0:\*: other hosts can reach it, so it needs CURVE keys.*"
                                         r"medvl-engine keys DIR"):
        GroupReceiver("tcp://0.0.0.0:*")
    with pytest.raises(ValueError, match="needs CURVE keys"):
        GroupSender("tcp://learner.example:5555", "w0")
    # The learner and the workers it starts share the environment: it binds every interface, they connect
    # on loopback, and both use the keys.
    monkeypatch.setenv(KEYS_ENV, str(keys))
    with GroupReceiver("tcp://0.0.0.0:*", credits=4) as receiver:
        sender = closing(GroupSender(receiver.endpoint.replace("0.0.0.0", "127.0.0.1"), "w0", linger_s=0))
        assert handshake(receiver, sender) == 0
        sender.send(error(), timeout=5)
        assert receiver.recv(timeout=10).producer == "w0"


def test_missing_key_files_say_which_and_how_to_make_them(keys, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"key file .*nowhere/server\.key_secret is missing.*medvl-engine keys"):
        GroupReceiver("tcp://0.0.0.0:*", keys=tmp_path / "nowhere")
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(keys / "server.key", half / "server.key")
    with pytest.raises(FileNotFoundError, match=r"half/client\.key_secret is missing"):
        GroupSender("tcp://learner.example:5555", "w0", keys=half)
    (half / "client.key_secret").write_text("not a key\n")
    with pytest.raises(ValueError, match="client.key_secret is not a ZeroMQ key file"):
        GroupSender("tcp://learner.example:5555", "w0", keys=half)


@pytest.mark.parametrize(("endpoint", "reachable"), [
    ("tcp://0.0.0.0:5555", True), ("tcp://*:5555", True), ("tcp://eth0:5555", True), ("tcp://10.0.0.2:5555", True),
    ("tcp://learner:5555", True), ("tcp://[::]:5555", True), ("tcp://127.0.0.1:5555", False),
    ("tcp://127.0.1.1:*", False), ("tcp://localhost:5555", False), ("tcp://[::1]:5555", False),
    ("tcp://10.0.0.1:0;127.0.0.1:5555", False), ("ipc:///tmp/x.sock", False), ("inproc://x", False),
])
def test_which_endpoints_other_hosts_reach(endpoint, reachable):
    assert reachable_from_other_hosts(endpoint) is reachable
