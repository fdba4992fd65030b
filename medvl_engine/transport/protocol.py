"""The ZeroMQ channel of scored rollout groups: `GroupSender` (rollout worker) -> `GroupReceiver` (learner).

This module holds the protocol (constants, errors, helpers both sides share); the sides are in
`sender.py` and `receiver.py`, the CURVE key check of the receiver in `admission.py`.

Socket pattern: the receiver is a ROUTER, each sender a DEALER. The channel is two-way per producer
(groups flow to the learner; credits and weight announcements flow back, to one producer or to all),
and ROUTER/DEALER is the ZeroMQ pattern that gives every peer an address on one asynchronous
bidirectional connection. REQ/REP would allow one group per round trip (~130 us, far below the link's
~25k messages/s); PUSH/PULL is one-way and would need a second socket pair matched by hand; PUB/SUB
drops messages at its high-water mark. Either side may bind (`bind=` / `connect=`): `ipc://` on one
node, `tcp://` across nodes.

Protocol (messages in `medvl_engine.transport.messages`):
1. The sender connects and sends `Hello(producer, pid)`. The Hello binds the connection's routing id (128
   random bits per process, chosen by the sender) to the producer: from then on every frame of that
   connection is that producer's, and a frame whose body names another producer is dropped. Nothing is
   accepted from a connection before its Hello.
2. The receiver answers `Credit(producer, credits, next_seq, consumer_version, window, max_message_bytes,
   shard, num_shards)`: `next_seq` is the first sequence number of this producer it has not received, and the
   producer may send sequence numbers below `next_seq + credits`; `shard` of `num_shards` is the share of the
   stream the receiver assigned to this producer id (a learner assigns `rollout-K` shard K: positions
   K mod N, position `seq * N + K`); then the latest `WeightVersion`, if one was announced.
3. The sender numbers its messages 0, 1, 2, ... per producer (`RolloutGroup` and `RolloutError` alike)
   and never goes past its limit, so at most `window` (the receiver's `credits=`) of its messages are in
   transit or waiting unconsumed in the receiver: a slow learner bounds the workers' memory.
4. The receiver grants credit as its application consumes messages: every `credits // 4` messages
   per producer, and, before it reads the socket, to every producer that has used up its credit. The
   sender looks for Credits when its credit runs under a quarter window (and every 8th send). Each
   Credit restates the whole limit, so a repeated Credit does no harm.
5. Weights pushed over torch.distributed (`transport.weight_sync distributed`): the `WeightVersion` names
   the buckets; a sender whose engine received them answers `WeightsLoaded(producer, version)` (no
   sequence number, no credit), and `GroupReceiver.wait_for` waits for it.
6. A sender sends a `Heartbeat` every few seconds (no sequence number, no credit): a learner that started
   the producer's process kills and restarts it when they stop (a stopped or hung process).
7. The receiver ends a session with `Stop(kind, reason)`: `finished` when it closes (the run is over: a
   worker started by hand exits 0), `session_ended` after a protocol violation (the process exits for a
   restart, which resumes where the receiver stands), `unknown_producer` for an id it assigned no shard. A
   sender reads it as `Stopped`. A sender whose connection has been down for a while (the receiver's process
   is gone) sees it in `receiver_down_s`, and a rollout worker exits after its `learner_timeout_s`.
8. A closing sender sends `Goodbye`, and the receiver answers with a Credit whose `next_seq` says how
   much of the stream arrived; the sender closes once it is all there (or `linger_s` has passed).

Admission: the receiver outlives any peer. A frame that is not one message (`multipart`), not msgpack
(`undecodable`), not a message of ours or of impossible shape (`invalid`), a Credit or WeightVersion
(`unexpected_type`), from a connection that never said Hello (`no_hello`), naming another producer than its
connection's (`wrong_producer`), at or past the producer's credit limit (`over_credit`), a Hello of a new
producer past `max_producers` (`too_many_producers`) or of an id without a shard (`unknown_producer`), a frame
whose CURVE key belongs to another producer than it speaks for (`wrong_key`), or a message at a position
outside its producer's shard (`wrong_shard`) is dropped, counted in `stats.dropped[reason]` and logged with
the peer (its producer, or its address and key's producer id; never its routing id, which ROUTER_HANDOVER
trusts, nor a key; the 1st, 10th, 100th ... of each reason), and the stream goes on. Nothing but a Hello
is decoded from a connection before its Hello: a larger frame (`MAX_HELLO_BYTES`) is dropped as `no_hello`
unread. Every list, string and bytes field has a wire limit (`messages.py`) that msgspec checks from the
field's header while decoding (`oversized`). A strict receiver (`strict=True`, the learner's) also ends
the session of the connection that broke the protocol (its later frames are `no_hello`; logged with the
producer's name), refuses a message past a sequence gap (`sequence_gap`), one without a stream position
(`no_position`) and one at or past the announced window (`outside_window`). A message over
`max_message_bytes` never reaches the channel: libzmq (ZMQ_MAXMSGSIZE) cuts the connection that sent it
(a DEALER reconnects) without telling why, so those are not counted; a GroupSender refuses to send one.

Memory: a producer's messages are accepted only below its credit limit, so at most `credits` of them wait
here unconsumed; libzmq reads at most `credits + 16` more from one connection (RCVHWM) before it stops
reading it (TCP then throttles the sender). Each message is at most `max_message_bytes` (the learner derives
it from the run's settings: `trainers.placement.max_message_bytes`), and there are at most `max_producers`
producers (with `shards`: exactly those ids) and `_MAX_SESSIONS` remembered connections each. A strict
receiver admits only positions below the learner's window, so the learner's reorder buffer holds no more.

Security: identity is a key, not a name. Every `tcp://` endpoint, loopback included (any local user's
process reaches it), uses ZeroMQ CURVE (`medvl_engine.transport.keys`) unless the run says `insecure`: the
connection is encrypted, only holders of a producer's key pair finish the handshake (a stranger's frame
never arrives), and each key may speak only as its own producer id (the ZAP User-Id on every frame): a Hello
as another id, a live producer's "restart" included, is refused (`wrong_key`). An `ipc://` socket file is
created owner-only (0600): its trust boundary is the OS user, whose processes may say Hello as any producer
(one node, one user). The learner assigns shards to ids; two live producers never hold one shard (one live
session per id). Admission bounds what an authenticated peer's mistakes can cost.

Sequence numbers: the receiver delivers, per producer, 0, 1, 2, ... in order and each once. A message
below the expected number is a duplicate: dropped and counted (`stats.duplicates`). A message above it
means messages were lost: `recv` raises `SequenceGap` once (the loss is already counted in
`stats.lost`, the message is kept, and a caller that catches it may go on), or, with `on_gap="count"`,
only counts it. A strict receiver refuses the message past the gap and ends that session (above): its
position stays at the first missing number, so the producer's next process regenerates from there; a
live process of it gets no more credit, and the learner's wait for the missing position runs out.

Restart contract: a sequence number names a position in the producer's stream of prompts, not one
particular sample. A producer that restarts (a new process with the same `producer_id`) asks the
receiver where it stands, `sender.handshake()` returns that position, and the rollout side regenerates
from it: position k gets the same prompt as before. Messages the dead process had already put on the
wire may still arrive after the new one starts; the first copy of position k to arrive is delivered,
the other is dropped as a duplicate, so nothing is lost or delivered twice. One live process per
`producer_id`. The receiver must stay up meanwhile; a new receiver (a learner restart) continues from
`start_seqs=` (saved from `receiver.positions()`), and the producers are restarted so they ask again.

Usage:
    # learner (keys from `medvl-engine keys DIR --workers 2`)
    receiver = GroupReceiver("tcp://0.0.0.0:5555", credits=32, keys="DIR", shards={"rollout-0": (0, 2), ...})
    for msg in receiver:            # RolloutGroup | RolloutError, per producer in sequence order
        ...
        receiver.announce(WeightVersion(version=3, path="/ckpt/step3"))
    # rollout worker
    sender = GroupSender("tcp://learner:5555", "rollout-0", keys="DIR")   # uses DIR/rollout-0.key_secret
    position = sender.handshake()   # regenerate the prompt stream from this position
    sender.send(group)              # group.seq = AUTO_SEQ (-1) or the position it was made for
    update = sender.poll_weight_version()   # or GroupSender(..., on_weights=callback)
    sender.close()

Zero-copy where pyzmq allows: messages go out with `copy=False` (pyzmq hands buffers over 64 KiB to
libzmq without a copy) and are decoded straight from the received frame's buffer.
"""

from __future__ import annotations

import os
import time

import zmq

from medvl_engine.errors import ConfigError
from medvl_engine.transport.messages import MAX_NAME, RolloutError, RolloutGroup

AUTO_SEQ = -1  # a message's `seq` that the sender fills with the stream's next position
MAX_MESSAGE_BYTES = 256 << 20  # default receiver limit: a group of 8 answers of 4k tokens is ~0.3 MB
MAX_PRODUCERS = 1024
_MAX_NAME = MAX_NAME  # characters of a producer name
# The largest frame decoded from a connection that has not said Hello (only a Hello is admitted there): a
# Hello is its type tag, a name of <= 256 characters (<= 4 UTF-8 bytes each: 1 KiB) and two ints, < 1.1 KiB.
MAX_HELLO_BYTES = 2048

StreamMessage = RolloutGroup | RolloutError


class TransportError(RuntimeError):
    """The channel cannot go on as the protocol says."""


class ProtocolError(TransportError):
    """A peer sent something the protocol does not allow (undecodable bytes, a wrong message type)."""


class SequenceGap(TransportError):
    """Messages of a producer were lost: `received` arrived while `expected` was the next number."""

    def __init__(self, producer: str, expected: int, received: int) -> None:
        self.producer, self.expected, self.received = producer, expected, received
        super().__init__(f"producer {producer!r}: expected sequence number {expected}, received {received} "
                         f"({received - expected} message(s) lost)")


def _check_timeout(timeout: float | None, where: str) -> float | None:
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"{where}: timeout must be None or >= 0 seconds, got {timeout!r}")
    return None if timeout is None else time.monotonic() + timeout


def _open(sock: zmq.Socket, endpoint: str, bind: bool) -> None:
    """Connect, or bind; an ipc socket file is owner-only from the moment it exists."""
    if not bind:
        sock.connect(endpoint)
        return
    if not endpoint.startswith("ipc://"):
        sock.bind(endpoint)
        return
    if endpoint.startswith("ipc://@"):
        raise ConfigError("an abstract ipc socket (ipc://@name) has no file permissions: any local user could "
                          "connect; bind a path (ipc:///run/user/UID/medvl.sock)")
    # libzmq creates the file inside zmq_bind, in this thread: under umask 077 it is born 0600, where a chmod
    # after the bind would leave a moment in which any local user could connect. The umask is the process's,
    # restored at once; a file another thread creates meanwhile is at worst owner-only.
    umask = os.umask(0o077)
    try:
        sock.bind(endpoint)
    finally:
        os.umask(umask)
    os.chmod(sock.getsockopt_string(zmq.LAST_ENDPOINT)[len("ipc://"):], 0o600)
