"""CURVE on tcp, identity by key: `medvl-engine keys DIR --workers N` writes a pair per worker, a receiver with
keys admits only those keys and only under each key's own producer id, and tcp without keys (loopback
included) refuses to start unless told `insecure`.

Once every tcp endpoint without keys ran ZeroMQ's NULL mechanism (a raw DEALER on tcp://127.0.0.1 said Hello
as the live `rollout-0` and had its groups trained on), and with keys every worker shared one pair (the holder
of it could say it was any producer)."""

from __future__ import annotations

import os
import shutil
import stat

import pytest
import zmq
from transport_producer import RawPeer, handshake

from medvl_engine import cli
from medvl_engine.errors import ConfigError
from medvl_engine.transport.keys import KEYS_ENV, create_keys, reachable_from_other_hosts
from medvl_engine.transport.messages import RolloutError, encode
from medvl_engine.transport.protocol import TransportError
from medvl_engine.transport.receiver import GroupReceiver
from medvl_engine.transport.sender import GroupSender

SHARDS = {"rollout-0": (0, 2), "rollout-1": (1, 2)}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "keys"
    assert cli.main(["keys", str(folder), "--workers", "2"]) == 0
    return folder


def error(seq: int = -1, position: int = -1) -> RolloutError:
    return RolloutError(producer="", seq=seq, prompt_id="q", reason="timeout", position=position)


def read(receiver: GroupReceiver, seconds: float = 0.5) -> list:
    got = []
    try:
        while True:
            got.append(receiver.recv(timeout=seconds))
    except TimeoutError:
        return got


def test_the_keys_command_writes_a_pair_per_worker_owner_only(keys, capsys):
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in keys.iterdir()}
    assert modes == {"server.key": 0o644, "server.key_secret": 0o600, "rollout-0.key": 0o644,
                     "rollout-0.key_secret": 0o600, "rollout-1.key": 0o644, "rollout-1.key_secret": 0o600}
    before = (keys / "server.key_secret").read_bytes()
    assert cli.main(["keys", str(keys), "--workers", "2"]) == 2  # every node shares one set: never replaced silently
    assert "already holds" in capsys.readouterr().err and (keys / "server.key_secret").read_bytes() == before


def test_a_growing_run_gets_keys_for_its_new_workers_only(tmp_path):
    folder = tmp_path / "keys"
    create_keys(folder, workers=1)
    kept = {name: (folder / name).read_bytes() for name in ("server.key_secret", "rollout-0.key_secret")}
    written = create_keys(folder, workers=3)
    assert sorted(p.name for p in written) == ["rollout-1.key", "rollout-1.key_secret", "rollout-2.key",
                                               "rollout-2.key_secret"]
    assert all((folder / name).read_bytes() == data for name, data in kept.items())


def test_each_worker_gets_through_with_its_own_key(keys, closing):
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, keys=keys, shards=SHARDS) as receiver:
        senders = [closing(GroupSender(receiver.endpoint, f"rollout-{k}", keys=keys, linger_s=0)) for k in range(2)]
        for k, sender in enumerate(senders):
            assert handshake(receiver, sender) == 0
            assert sender.shard == (k, 2)  # the learner's assignment, told in its Credit
        for k, sender in enumerate(senders):
            sender.send(error(position=k), timeout=5)
        assert sorted(m.producer for m in read(receiver)) == ["rollout-0", "rollout-1"]


def test_a_sender_without_keys_is_refused(keys, closing):
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, keys=keys) as receiver:
        sender = closing(GroupSender(receiver.endpoint, "rollout-0", linger_s=0, insecure=True))
        with pytest.raises(TransportError, match="has no CURVE keys and the receiver asks for them"):
            sender.handshake(timeout=10)
        assert read(receiver, 0.3) == [] and receiver.stats.producers == {}


def test_a_key_of_another_run_is_refused(keys, tmp_path, closing):
    other = tmp_path / "other"
    create_keys(other)
    shutil.copy(keys / "server.key", other / "server.key")  # knows the server, but holds no key of this run
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, keys=keys) as receiver:
        sender = closing(GroupSender(receiver.endpoint, "rollout-0", keys=other, linger_s=0))
        assert read(receiver, 0.3) == []  # nothing gets through
        with pytest.raises(TransportError, match="refused this producer's CURVE key"):
            sender.handshake(timeout=10)
        assert receiver.stats.dropped.get("unknown_key", 0) >= 1 and receiver.stats.producers == {}


def test_a_worker_cannot_speak_for_another_not_even_as_its_restart(keys, tmp_path, closing):
    """The holder of rollout-1's key says Hello as the live rollout-0 (its "restart"), and as a new name:
    both refused as `wrong_key`; rollout-0's stream and credit are untouched."""
    impostor_keys = tmp_path / "impostor"
    impostor_keys.mkdir()
    shutil.copy(keys / "server.key", impostor_keys / "server.key")
    for suffix in ("key", "key_secret"):  # rollout-1's own pair, filed under rollout-0's and rollout-7's names
        shutil.copy(keys / f"rollout-1.{suffix}", impostor_keys / f"rollout-0.{suffix}")
        shutil.copy(keys / f"rollout-1.{suffix}", impostor_keys / f"rollout-7.{suffix}")
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, keys=keys, shards=SHARDS, strict=True) as receiver:
        honest = closing(GroupSender(receiver.endpoint, "rollout-0", keys=keys, linger_s=0))
        assert handshake(receiver, honest) == 0
        honest.send(error(position=0), timeout=5)
        assert [m.seq for m in read(receiver)] == [0]
        for name in ("rollout-0", "rollout-7"):
            impostor = closing(GroupSender(receiver.endpoint, name, keys=impostor_keys, linger_s=0))
            with pytest.raises(TimeoutError):  # never answered: no Credit, no position, no weights
                for _ in range(20):
                    read(receiver, 0.05)
                    impostor.handshake(timeout=0.05)
        assert receiver.stats.dropped["wrong_key"] == 2
        assert receiver.stats.producers["rollout-0"].sessions == 1 and "rollout-7" not in receiver.stats.producers
        honest.send(error(position=2), timeout=5)  # the honest stream goes on
        assert [m.seq for m in read(receiver)] == [1]


def test_a_raw_peer_on_loopback_tcp_without_keys_never_reaches_a_keyed_learner(keys, closing):
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, keys=keys, shards=SHARDS, strict=True) as receiver:
        peer = closing(RawPeer(receiver.endpoint, "rollout-0", hello=True))
        peer.sock.send(encode(RolloutError(producer="rollout-0", seq=0, prompt_id="q", reason="x", position=0)))
        assert read(receiver) == [] and receiver.stats.producers == {}
        assert not peer.sock.poll(200, zmq.POLLIN)  # no Credit came back


def test_a_sender_with_the_wrong_server_key_never_connects(keys, tmp_path, closing):
    other = tmp_path / "other"
    create_keys(other)
    for name in ("rollout-0.key", "rollout-0.key_secret"):
        shutil.copy(keys / name, other / name)  # its own pair, another server's public key
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, keys=keys) as receiver:
        sender = closing(GroupSender(receiver.endpoint, "rollout-0", keys=other, linger_s=0))
        assert read(receiver) == []
        with pytest.raises(TimeoutError, match="is server.key the receiver's"):
            sender.handshake(timeout=0.5)
        assert receiver.stats.producers == {}


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:*", "tcp://0.0.0.0:*", "tcp://localhost:*"])
def test_tcp_without_keys_refuses_to_start_unless_told_insecure(endpoint, closing):
    with pytest.raises(ConfigError, match=r"so it needs CURVE keys.*medvl-engine keys DIR.*insecure"):
        GroupReceiver(endpoint)
    with pytest.raises(ConfigError, match="needs CURVE keys"):
        GroupSender(endpoint.replace("*", "5555"), "rollout-0")
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, insecure=True) as receiver:  # said out loud: no CURVE
        sender = closing(GroupSender(receiver.endpoint, "rollout-0", linger_s=0, insecure=True))
        assert handshake(receiver, sender) == 0


def test_the_learner_and_its_workers_share_the_keys_through_the_environment(keys, monkeypatch, closing):
    monkeypatch.setenv(KEYS_ENV, str(keys))
    with GroupReceiver("tcp://0.0.0.0:*", credits=4) as receiver:
        sender = closing(GroupSender(receiver.endpoint.replace("0.0.0.0", "127.0.0.1"), "rollout-1", linger_s=0))
        assert handshake(receiver, sender) == 0
        sender.send(error(), timeout=5)
        assert receiver.recv(timeout=10).producer == "rollout-1"


def test_missing_key_files_say_which_and_how_to_make_them(keys, tmp_path):
    with pytest.raises(ConfigError, match=r"key file .*nowhere/server\.key_secret is missing.*medvl-engine keys"):
        GroupReceiver("tcp://0.0.0.0:*", keys=tmp_path / "nowhere")
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(keys / "server.key", half / "server.key")
    with pytest.raises(ConfigError, match=r"half/rollout-3\.key_secret is missing"):
        GroupSender("tcp://learner.example:5555", "rollout-3", keys=half)
    (half / "rollout-3.key_secret").write_text("not a key\n")
    with pytest.raises(ConfigError, match="rollout-3.key_secret is not a ZeroMQ key file"):
        GroupSender("tcp://learner.example:5555", "rollout-3", keys=half)
    shutil.copy(keys / "server.key_secret", half / "server.key_secret")
    with pytest.raises(ConfigError, match="holds no producer's public key"):
        GroupReceiver("tcp://127.0.0.1:*", keys=half)


def test_logs_name_neither_routing_ids_nor_keys(keys, caplog, closing):
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, keys=keys, shards=SHARDS, strict=True) as receiver:
        sender = closing(GroupSender(receiver.endpoint, "rollout-0", keys=keys, linger_s=0))
        assert handshake(receiver, sender) == 0
        sender.send(error(seq=0, position=1), timeout=5)  # not its shard's position: dropped and logged
        read(receiver)
        assert receiver.stats.dropped == {"wrong_shard": 1}
    text = caplog.text
    route = sender._sock.getsockopt(zmq.ROUTING_ID).decode()
    public_keys = [line.split('"')[1] for name in ("rollout-0.key", "server.key")
                   for line in (keys / name).read_text().splitlines() if "public-key" in line]
    secrets_and_keys = [route, route.rpartition("/")[2], *public_keys]
    assert "wrong_shard" in text and not any(s in text for s in secrets_and_keys)


@pytest.mark.parametrize(("endpoint", "reachable"), [
    ("tcp://0.0.0.0:5555", True), ("tcp://*:5555", True), ("tcp://eth0:5555", True), ("tcp://10.0.0.2:5555", True),
    ("tcp://learner:5555", True), ("tcp://[::]:5555", True), ("tcp://127.0.0.1:5555", False),
    ("tcp://127.0.1.1:*", False), ("tcp://localhost:5555", False), ("tcp://[::1]:5555", False),
    ("tcp://10.0.0.1:0;127.0.0.1:5555", False), ("ipc:///tmp/x.sock", False), ("inproc://x", False),
])
def test_which_endpoints_other_hosts_reach(endpoint, reachable):
    assert reachable_from_other_hosts(endpoint) is reachable
