"""The producer side of the channel: `GroupSender` (protocol in `medvl_engine.transport.protocol`)."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from medvl_engine.errors import ConfigError
from medvl_engine.profiling import stage
from medvl_engine.transport.keys import KEYS_HINT, curve_folder, load_client_keys
from medvl_engine.transport.messages import (
    Credit,
    Goodbye,
    Heartbeat,
    Hello,
    Message,
    RolloutError,
    RolloutGroup,
    Stop,
    WeightsLoaded,
    WeightVersion,
    decode,
    encode,
)
from medvl_engine.transport.protocol import (
    _MAX_NAME,
    AUTO_SEQ,
    ProtocolError,
    StreamMessage,
    TransportError,
    _check_timeout,
    _open,
)

_MAX_CONTROL_BYTES = 1 << 20  # what a sender reads: Credits and WeightVersions, a few hundred bytes each


class Stopped(TransportError):
    """The receiver ended this producer's session (`Stop`): `kind` "finished" (the run is over),
    "session_ended" (a protocol violation; a new process of the producer resumes) or "unknown_producer"."""

    def __init__(self, producer: str, kind: str, reason: str) -> None:
        self.kind, self.reason = kind, reason
        super().__init__(f"producer {producer!r}: the learner ended its session ({kind}): {reason}")


class ReceiverGone(TransportError):
    """The connection to the receiver has been down longer than the producer waits for it to come back."""


def _poll_ms(deadline: float | None) -> int | None:
    return None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))


def _decode(frame: zmq.Frame, source: str) -> Message:
    try:
        return decode(frame.buffer)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable message ({len(frame.buffer)} bytes) from {source}: {exc}") from exc


@dataclass
class SenderStats:
    sent: int = 0
    max_outstanding: int = 0  # most messages ever sent and not yet consumed by the receiver's application
    credit_waits: int = 0  # sends that had to wait for credit
    credit_wait_s: float = 0.0
    resumed_from: int = -1  # the position the receiver gave at the handshake
    weight_updates: int = 0


# Handshake failures the sender watches for until its first Credit, to say why a connection never came up.
_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class GroupSender:
    """Producer side: numbers messages per producer and sends them within the receiver's credit.

    Not thread-safe (a ZeroMQ socket belongs to one thread): call it from the thread that owns it.
    `on_weights` is called from inside `send`/`poll_weight_version`/`handshake` when an announcement arrives.
    `keys` is a folder from `medvl-engine keys` (default: $MEDVL_TRANSPORT_KEYS), from which the producer
    loads its own key pair (`{producer_id}.key_secret`); CURVE is used on every network endpoint unless
    `insecure` (`medvl_engine.transport.keys.use_curve`). A `Stop` from the receiver raises `Stopped` out of
    the call that reads it; `receiver_down_s` says how long the connection has been down.
    """

    def __init__(self, endpoint: str, producer_id: str, *, connect: bool = True,
                 on_weights: Callable[[WeightVersion], None] | None = None, weight_version: int = 0,
                 linger_s: float = 10.0, keys: str | os.PathLike | None = None, insecure: bool = False,
                 context: zmq.Context | None = None) -> None:
        if not isinstance(producer_id, str) or not producer_id or len(producer_id) > _MAX_NAME:
            raise ValueError(f"GroupSender: producer_id must be a non-empty string of at most {_MAX_NAME} "
                             f"characters, got {producer_id!r}")
        if linger_s < 0:
            raise ValueError(f"GroupSender {producer_id!r}: linger_s must be >= 0, got {linger_s}")
        who = f"GroupSender {producer_id!r}"
        folder = curve_folder(endpoint, keys, insecure, who)
        client_keys = None if folder is None else load_client_keys(folder, producer_id, who)
        self.producer_id = producer_id
        self.endpoint = endpoint
        self.stats = SenderStats()
        self._on_weights = on_weights
        self._linger_ms = int(linger_s * 1000)
        self._curve = client_keys is not None
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._next_seq = -1  # unknown until the first Credit
        self._limit = 0
        self._arrived = 0  # the receiver has every sequence number below this (the last Credit's next_seq)
        self._low_credit = 0  # below this much credit left, every send looks for a new Credit first
        self._consumed = 0  # the receiver's application has taken every sequence number below this
        self._max_message_bytes = 0  # the receiver's limit, from its Credits (0: not said)
        self._consumer_version = 0
        self._weights: WeightVersion | None = None
        self._new_weights = False
        self._handshake_trouble = ""
        self.shard: tuple[int, int] | None = None  # (shard, num_shards) the receiver assigned (its Credits say)
        self._down_since: float | None = None  # when the connection to the receiver went down (None: up)
        self._sock = self._context.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.MAXMSGSIZE, _MAX_CONTROL_BYTES)
        # One routing id per process, stable across TCP reconnects, new after a restart: the receiver tells a
        # restarted producer's leftovers from its new session. 128 random bits: the receiver hands a routing
        # id over to whoever connects with it (ROUTER_HANDOVER), so it must not be guessable.
        self._sock.setsockopt(zmq.ROUTING_ID, f"{producer_id}/{os.getpid()}/{secrets.token_hex(16)}".encode())
        if client_keys is not None:
            self._sock.curve_serverkey = client_keys.server_public
            self._sock.curve_publickey = client_keys.public
            self._sock.curve_secretkey = client_keys.secret
        self._monitor: zmq.Socket | None = self._sock.get_monitor_socket(
            _HANDSHAKE_FAILURES | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            _open(self._sock, endpoint, bind=not connect)
        except (zmq.ZMQError, ValueError, OSError) as exc:
            self.close(linger_s=0)
            raise ConfigError(f"{who}: cannot {'connect to' if connect else 'bind'} {endpoint!r}: {exc}") from exc
        # ZeroMQ queues the Hello until the connection is up, so the receiver may start later.
        self._sock.send(encode(Hello(producer=producer_id, pid=os.getpid(), weight_version=weight_version)))

    # -- public surface

    def handshake(self, timeout: float | None = None) -> int:
        """Wait for the receiver's first Credit and return the position to (re)generate from.

        `TransportError` at once when the receiver refuses the connection (CURVE on one end only, a key it
        does not accept); `TimeoutError` when nothing answers within `timeout` seconds."""
        deadline = _check_timeout(timeout, f"GroupSender {self.producer_id!r}.handshake")
        if self._next_seq < 0:
            poller = zmq.Poller()
            poller.register(self._sock, zmq.POLLIN)
            poller.register(self._monitor, zmq.POLLIN)
            while self._next_seq < 0:
                ready = dict(poller.poll(_poll_ms(deadline)))
                if not ready:
                    raise TimeoutError(f"GroupSender {self.producer_id!r}: no answer to its Hello from "
                                       f"{self.endpoint} within {timeout} s{self._handshake_trouble}")
                if self._monitor in ready:
                    self._connection_events()
                if self._sock in ready:
                    self._drain()
        return self._next_seq

    @property
    def next_seq(self) -> int:
        """The sequence number the next message gets (known after the handshake)."""
        if self._next_seq < 0:
            raise TransportError(f"GroupSender {self.producer_id!r}: next_seq is unknown before handshake()")
        return self._next_seq

    @property
    def consumer_version(self) -> int:
        """The newest policy version the receiver has announced (for the pool's staleness bound)."""
        return self._consumer_version

    def send(self, msg: StreamMessage, timeout: float | None = None) -> int:
        """Send one group or error; returns its sequence number.

        `msg.seq` is `AUTO_SEQ` (stamped here) or must equal `next_seq`; `msg.producer` is empty (stamped)
        or this producer. Blocks while the producer has no credit; `TimeoutError` after `timeout` seconds,
        with nothing sent. `ValueError`, with nothing sent, for a message larger than the receiver reads.
        """
        if not isinstance(msg, (RolloutGroup, RolloutError)):
            raise TypeError(f"GroupSender {self.producer_id!r}: can send RolloutGroup or RolloutError, "
                            f"not {type(msg).__name__}")
        if msg.producer != self.producer_id:
            if msg.producer:
                raise ValueError(f"GroupSender {self.producer_id!r}: message {msg.prompt_id!r} belongs to "
                                 f"producer {msg.producer!r}")
            msg.producer = self.producer_id
        deadline = _check_timeout(timeout, f"GroupSender {self.producer_id!r}.send")
        if self._next_seq < 0:
            self.handshake(timeout)
        if msg.seq != AUTO_SEQ and msg.seq != self._next_seq:
            raise ValueError(f"GroupSender {self.producer_id!r}: message {msg.prompt_id!r} has seq {msg.seq} but "
                             f"the stream is at {self._next_seq} (regenerate from next_seq after a restart)")
        auto = msg.seq == AUTO_SEQ
        msg.seq = self._next_seq
        with stage("send"):  # encoding, waiting for credit, handing the frame to libzmq
            payload = encode(msg)
            if self._max_message_bytes and len(payload) > self._max_message_bytes:
                if auto:
                    msg.seq = AUTO_SEQ
                raise ValueError(f"GroupSender {self.producer_id!r}: message {msg.prompt_id!r} is {len(payload)} "
                                 f"bytes, over the {self._max_message_bytes} bytes the receiver at {self.endpoint} "
                                 "reads")
            # Look for credits and announcements when the credit runs low (below a quarter window; Credits come
            # every quarter window) or every 8th send, not on every send: each look is a syscall and a zmq.Again.
            if self._limit - self._next_seq <= self._low_credit or not self.stats.sent & 7:
                self._drain()
            if self._next_seq >= self._limit:
                started = time.perf_counter()
                self.stats.credit_waits += 1
                while self._next_seq >= self._limit:
                    try:
                        self._wait_input(deadline, timeout, f"credit for seq {self._next_seq} (limit {self._limit})")
                    except TimeoutError:
                        if auto:
                            msg.seq = AUTO_SEQ
                        raise
                self.stats.credit_wait_s += time.perf_counter() - started
            self._sock.send(payload, copy=False)
        self._next_seq += 1
        self.stats.sent += 1
        self.stats.max_outstanding = max(self.stats.max_outstanding, self._next_seq - self._consumed)
        return msg.seq

    def poll_weight_version(self, timeout: float = 0.0) -> WeightVersion | None:
        """The newest WeightVersion announced since the last call, waiting up to `timeout` seconds
        (None: forever) for one; None when there is none."""
        deadline = _check_timeout(timeout, f"GroupSender {self.producer_id!r}.poll_weight_version")
        self._drain()
        while not self._new_weights and (deadline is None or time.monotonic() < deadline):
            if self._sock.poll(_poll_ms(deadline), zmq.POLLIN):
                self._drain()
        if not self._new_weights:
            return None
        self._new_weights = False
        return self._weights

    def heartbeat(self) -> None:
        """Say this process runs (`Heartbeat`; a learner that started it restarts it when they stop), and read
        what the receiver sent meanwhile (a `Stop` raises `Stopped`)."""
        try:
            # Never blocks: with its queue full the receiver is not reading, and one more beat would tell it nothing.
            self._sock.send(encode(Heartbeat(producer=self.producer_id)), zmq.NOBLOCK)
        except zmq.Again:
            pass
        self._drain()

    @property
    def receiver_down_s(self) -> float:
        """Seconds the connection to the receiver has been down (0 while it is up): a receiver that exited
        closed it. libzmq reconnects meanwhile; a restarted receiver brings it back up."""
        self._connection_events()
        return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    def report_loaded(self, version: int) -> None:
        """Tell the receiver this producer's engine runs policy `version` now (`WeightsLoaded`; a learner
        pushing weights over torch.distributed waits for it). Takes no credit and no sequence number."""
        self._sock.send(encode(WeightsLoaded(producer=self.producer_id, version=int(version))))

    def close(self, linger_s: float | None = None) -> None:
        """Close the socket once the receiver has everything sent, waiting at most `linger_s` seconds
        (default: the constructor's) for it to say so; then messages still queued are dropped."""
        if self._sock.closed:
            return
        self._stop_monitor()
        linger = self._linger_ms / 1000 if linger_s is None else linger_s
        deadline = time.monotonic() + linger
        if self._arrived < self._next_seq and linger > 0:
            self._drain()  # the Credits already here may say it all arrived
        if self._arrived < self._next_seq and linger > 0:
            self._sock.send(encode(Goodbye(producer=self.producer_id)))
            while self._arrived < self._next_seq and time.monotonic() < deadline:
                if self._sock.poll(_poll_ms(deadline), zmq.POLLIN):
                    self._drain()
        self._sock.close(linger=max(0, int((deadline - time.monotonic()) * 1000)))
        if self._own_context:
            self._context.term()

    def __enter__(self) -> GroupSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the connection: why it never came up (until the first Credit), whether it is down (after)

    def _connection_events(self) -> None:
        """Read the socket monitor's events: a refused handshake raises until the first Credit (after it, libzmq
        keeps reconnecting and `receiver_down_s` tells how long it has been down)."""
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_DISCONNECTED:
                self._down_since = self._down_since or time.monotonic()
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._down_since = None
            elif self._next_seq >= 0:
                continue
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise TransportError(f"GroupSender {self.producer_id!r}: the receiver at {self.endpoint} refused "
                                     f"this producer's CURVE key (ZAP status {value}): {self.producer_id}.key_secret "
                                     f"is not from the receiver's key folder")
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                    mine = "uses CURVE keys and the receiver does not" if self._curve else \
                        "has no CURVE keys and the receiver asks for them"
                    raise TransportError(f"GroupSender {self.producer_id!r}: {self.endpoint}: this sender {mine}; "
                                         f"give both ends the same key folder ({KEYS_HINT})")
                raise TransportError(f"GroupSender {self.producer_id!r}: handshake with {self.endpoint} failed "
                                     f"(ZeroMQ protocol error {value:#x})")
            else:
                # No detail: a CURVE handshake that cannot be decrypted (a server.key that is not the receiver's),
                # or a connection reset mid-handshake; libzmq retries, and a timeout says it happened.
                self._handshake_trouble = (" (handshakes failed: is server.key the receiver's?)" if self._curve
                                           else " (handshakes failed)")

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    # -- incoming: credits and weight announcements

    def _wait_input(self, deadline: float | None, timeout: float | None, what: str) -> None:
        if not self._sock.poll(_poll_ms(deadline), zmq.POLLIN):
            raise TimeoutError(f"GroupSender {self.producer_id!r}: no {what} from {self.endpoint} "
                               f"within {timeout} s")
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                frame = self._sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg = _decode(frame, f"the receiver at {self.endpoint}")
            if isinstance(msg, Credit):
                self._credit(msg)
            elif isinstance(msg, WeightVersion):
                self._weight_version(msg)
            elif isinstance(msg, Stop):
                raise Stopped(self.producer_id, msg.kind, msg.reason)
            else:
                raise ProtocolError(f"GroupSender {self.producer_id!r}: unexpected {type(msg).__name__} "
                                    f"from the receiver at {self.endpoint}")

    def _credit(self, credit: Credit) -> None:
        if credit.producer != self.producer_id:
            raise ProtocolError(f"GroupSender {self.producer_id!r}: received credit meant for {credit.producer!r}")
        if self._next_seq < 0:
            self._next_seq = credit.next_seq
            self._consumed = credit.next_seq
            self.stats.resumed_from = credit.next_seq
        # A restarted producer's new session may be told `next_seq` beyond its own position when the
        # dead process's last messages arrive after the Hello: those positions will come as duplicates.
        self._limit = max(self._limit, credit.next_seq + credit.credits)
        self._arrived = max(self._arrived, credit.next_seq)
        self._low_credit = credit.window // 4
        self._consumed = max(self._consumed, credit.next_seq + credit.credits - credit.window)
        self._consumer_version = max(self._consumer_version, credit.consumer_version)
        self._max_message_bytes = credit.max_message_bytes
        if credit.num_shards:
            self.shard = (credit.shard, credit.num_shards)

    def _weight_version(self, update: WeightVersion) -> None:
        if self._weights is not None and update.version < self._weights.version:
            return
        self._weights = update
        self._new_weights = True
        self._consumer_version = max(self._consumer_version, update.version)
        self.stats.weight_updates += 1
        if self._on_weights is not None:
            self._on_weights(update)
