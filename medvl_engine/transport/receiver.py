"""The learner side of the channel: `GroupReceiver` admits, orders and acknowledges what the producers send,
and grants them credit (protocol in `medvl_engine.transport.protocol`)."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping

import msgspec
import zmq

from medvl_engine.errors import ConfigError
from medvl_engine.profiling import stage
from medvl_engine.transport.admission import (
    ProducerStats,
    ReceiverStats,
    _is_log_count,
    _ProducerKeys,
    end_session,
    peer_name,
    strict_violation,
)
from medvl_engine.transport.keys import curve_folder, load_server_keys
from medvl_engine.transport.messages import (
    Credit,
    Goodbye,
    Heartbeat,
    Hello,
    RolloutError,
    RolloutGroup,
    Stop,
    WeightsLoaded,
    WeightVersion,
    decode,
    encode,
    shape_error,
)
from medvl_engine.transport.protocol import (
    _MAX_NAME,
    MAX_HELLO_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_PRODUCERS,
    SequenceGap,
    StreamMessage,
    _check_timeout,
    _open,
)

log = logging.getLogger(__name__)

_MAX_SESSIONS = 8  # connections remembered per producer: a dead process's last messages are still accepted
_CONTROL_SLACK = 16  # RCVHWM above the credit: a Hello and a Goodbye per connection, with room for repeats
_DRAIN_BATCH = 256  # frames read per pass, so a flood cannot keep recv from returning what is ready
_MAX_WAIT_MS = 2**31 - 1  # ZMQ_RCVTIMEO is an int (ms); a longer timeout waits in several reads


class GroupReceiver:
    """Consumer side: an iterator of RolloutGroup / RolloutError, per producer in sequence order.

    `credits` is the grant per producer: how many of its messages may be in transit or waiting here
    unconsumed. A message counts as consumed when `recv` hands it out. `max_producers` caps the producer
    names it keeps, `max_message_bytes` the size of a message (ZMQ_MAXMSGSIZE). `keys` is a folder from
    `medvl-engine keys` (default: $MEDVL_TRANSPORT_KEYS); CURVE is used on every network endpoint unless
    `insecure` (`medvl_engine.transport.keys.use_curve`), and a frame is then its key's producer's only.
    `shards` assigns each producer id its share of the stream, `(shard, num_shards)`: only those ids get in,
    and only with their positions. `strict=True` (the learner's) ends the session of a connection that breaks
    the protocol, counts a sequence gap as a violation instead of `on_gap`, and admits only messages with a
    stream position below the announced window. Not thread-safe.
    """

    def __init__(self, endpoint: str, *, credits: int = 32, bind: bool = True,
                 start_seqs: Mapping[str, int] | None = None, on_gap: str = "raise",
                 max_producers: int = MAX_PRODUCERS, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 keys: str | os.PathLike | None = None, insecure: bool = False,
                 shards: Mapping[str, tuple[int, int]] | None = None,
                 context: zmq.Context | None = None, strict: bool = False) -> None:
        if not isinstance(credits, int) or credits < 1:
            raise ValueError(f"GroupReceiver: credits must be a positive int, got {credits!r}")
        if on_gap not in ("raise", "count"):
            raise ValueError(f"GroupReceiver: on_gap must be 'raise' or 'count', got {on_gap!r}")
        for name, value in (("max_producers", max_producers), ("max_message_bytes", max_message_bytes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GroupReceiver: {name} must be a positive int, got {value!r}")
        for name, seq in (start_seqs or {}).items():
            if not isinstance(seq, int) or seq < 0:
                raise ValueError(f"GroupReceiver: start_seqs[{name!r}] must be an int >= 0, got {seq!r}")
        for name, (shard, num_shards) in (shards or {}).items():
            if not 0 <= shard < num_shards:
                raise ValueError(f"GroupReceiver: shards[{name!r}] = ({shard}, {num_shards}) is no shard")
        folder = curve_folder(endpoint, keys, insecure, "GroupReceiver")
        server_keys = None if folder is None else load_server_keys(folder, "GroupReceiver")
        self._credits = credits
        # Acks go out every quarter window: one Credit per 8 groups at the default 32, and the producer
        # still has 3/4 of its window to keep sending while the Credit travels.
        self._ack_every = max(1, credits // 4)
        self._start_seqs = dict(start_seqs or {})
        self._on_gap = on_gap
        self._strict = bool(strict)
        self._shards = dict(shards or {})
        self._max_producers = len(self._shards) if self._shards else max_producers
        self._curve = server_keys is not None
        self._max_message_bytes = max_message_bytes
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._auth = None
        self._key_check: _ProducerKeys | None = None
        self._producers: dict[str, ProducerStats] = {}
        self._routes: dict[bytes, ProducerStats] = {}  # the last _MAX_SESSIONS sessions of every producer
        self._sessions: dict[str, deque[bytes]] = {}
        self._sock = self._context.socket(zmq.ROUTER)
        # A producer reconnecting with its routing id takes its route over instead of being refused.
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        # A producer never has more than `credits` messages out; past that libzmq stops reading a connection
        # until we have read what it queued, so a flood waits in the sender's kernel, not in our memory.
        self._sock.setsockopt(zmq.RCVHWM, credits + _CONTROL_SLACK)
        self.endpoint = endpoint
        try:
            if server_keys is not None:
                self._start_authenticator(server_keys, endpoint)
            _open(self._sock, endpoint, bind)
        except (zmq.ZMQError, ValueError, OSError) as exc:
            self.close()
            raise ConfigError(f"GroupReceiver: cannot {'bind' if bind else 'connect to'} {endpoint!r}: {exc}") from exc
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint
        if self._key_check is not None:
            self._key_check.endpoint = self.endpoint
        self._ready: deque[StreamMessage | SequenceGap] = deque()
        self._unacked: set[str] = set()
        self._weights: WeightVersion | None = None
        self._received = 0
        self._delivered = 0
        self._dropped: dict[str, int] = {}
        self._rcvtimeo = -1  # the socket's current RCVTIMEO (ms), set only when a wait needs another

    # -- public surface

    def recv(self, timeout: float | None = None) -> StreamMessage:
        """The next message; `TimeoutError` when none arrives within `timeout` seconds."""
        if not self._ready:
            with stage("receive"):  # waiting for the socket, decoding and admitting what arrived
                self._wait(timeout)
        msg = self._ready.popleft()
        if isinstance(msg, SequenceGap):
            raise msg
        state = self._producers[msg.producer]
        state.buffered -= 1
        state.consumed = msg.seq + 1
        state.pending_acks += 1
        self._delivered += 1
        if state.pending_acks >= self._ack_every:
            self._send_credit(state)
        else:
            self._unacked.add(state.producer)
        return msg

    def __iter__(self) -> Iterator[StreamMessage]:
        while True:
            yield self.recv()

    def announce(self, update: WeightVersion) -> None:
        """Tell every producer (and every later one, at its Hello) that policy `update.version` is ready."""
        if not isinstance(update, WeightVersion):
            raise TypeError(f"GroupReceiver.announce takes a WeightVersion, not {type(update).__name__}")
        if self._weights is not None and update.version < self._weights.version:
            raise ValueError(f"GroupReceiver.announce: version {update.version} is older than the announced "
                             f"{self._weights.version}")
        self._weights = update
        payload = encode(update)
        for state in self._producers.values():
            if state.route:
                self._sock.send_multipart([state.route, payload])

    def wait_for(self, producers: Iterable[str], version: int | None = None, timeout: float | None = None) -> None:
        """Read the socket until every producer of `producers` has said Hello (so it has the latest
        announcement) and, with a `version`, reported that version loaded (`WeightsLoaded`); what arrives
        meanwhile is kept for `recv`. `TimeoutError` after `timeout` seconds, naming who is missing."""
        deadline = _check_timeout(timeout, "GroupReceiver.wait_for")
        producers = list(producers)

        def missing() -> list[str]:
            return [name for name in producers if name not in self._producers or not self._producers[name].route
                    or (version is not None and self._producers[name].weight_version < version)]

        while missing():
            self._flush_acks()
            if self._drain():
                continue
            wait_ms = -1 if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1000))
            if not wait_ms or not self._sock.poll(wait_ms, zmq.POLLIN):
                if deadline is not None and time.monotonic() >= deadline:
                    what = "said Hello" if version is None else f"reported weights v{version} loaded"
                    raise TimeoutError(f"GroupReceiver on {self.endpoint}: {', '.join(missing())} not "
                                       f"{what} within {timeout} s")

    def last_seen(self, producer: str) -> float:
        """`time.monotonic()` of the last frame of `producer` this receiver accepted (0.0: none yet); frames still
        queued count once `read_queued` (or a `recv`) read them."""
        state = self._producers.get(producer)
        return 0.0 if state is None else state.last_seen

    def read_queued(self) -> None:
        """Take every frame already queued (kept for `recv`): heartbeats that waited while the application was
        busy, before it asks `last_seen`."""
        self._flush_acks()
        while self._drain() == _DRAIN_BATCH:
            pass

    def positions(self) -> dict[str, int]:
        """Per producer, the first sequence number not yet handed out: save it with a learner checkpoint
        and give it back as `start_seqs=` to a new receiver."""
        return {name: state.consumed for name, state in self._producers.items()}

    @property
    def stats(self) -> ReceiverStats:
        producers = {name: ProducerStats(**{**vars(s), "route": b""}) for name, s in self._producers.items()}
        dropped = dict(self._dropped)
        if self._key_check is not None and self._key_check.refused:
            dropped["unknown_key"] = self._key_check.refused
        return ReceiverStats(received=self._received, delivered=self._delivered,
                             duplicates=sum(s.duplicates for s in producers.values()),
                             lost=sum(s.lost for s in producers.values()), producers=producers, dropped=dropped)

    def stop(self, producer: str, kind: str, reason: str = "") -> None:
        """End `producer`'s live session with a `Stop` (see messages.py); its later frames are dropped."""
        state = self._producers.get(producer)
        if state is not None and state.route:
            route = state.route
            self._sock.send_multipart([route, encode(Stop(producer=producer, kind=kind, reason=reason[:4096]))])
            end_session(self._routes, self._sessions.get(producer), route, state)
            self._unacked.discard(producer)

    def close(self, reason: str = "") -> None:
        """Tell every live producer the run is over (`Stop` "finished": a worker started by hand exits), then
        close; `reason` is what they log."""
        if self._sock.closed:
            return
        live = [name for name, state in self._producers.items() if state.route]
        for name in live:
            self.stop(name, "finished", reason or "the learner finished")
        # A second for the Stops to leave; pending credits to producers are worthless once we are gone.
        self._sock.close(linger=1000 if live else 0)
        if self._auth is not None:
            self._auth.stop()
        if self._own_context:
            self._context.term()

    def __enter__(self) -> GroupReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- CURVE

    def _start_authenticator(self, server_keys, endpoint: str) -> None:
        """CURVE server with ZAP: libzmq asks pyzmq's authenticator thread about every new connection, and
        only the producers' public keys pass (without a ZAP handler CURVE would let any key in)."""
        from zmq.auth.thread import ThreadAuthenticator

        self._auth = ThreadAuthenticator(self._context)
        self._auth.start()
        self._key_check = _ProducerKeys(server_keys.producers, endpoint)
        self._auth.configure_curve_callback(domain="*", credentials_provider=self._key_check)
        self._auth.curve_user_id = self._key_check.user_id  # every frame then names its key's producer
        self._sock.curve_server = True
        self._sock.curve_secretkey = server_keys.secret
        self._sock.curve_publickey = server_keys.public

    # -- incoming

    def _wait(self, timeout: float | None) -> None:
        """Take messages off the socket until one is ready to hand out: all that are queued, or else the
        first to arrive (a blocking read under RCVTIMEO: one call where poll + read would be two)."""
        deadline = _check_timeout(timeout, "GroupReceiver.recv")
        while not self._ready:
            # Before every read, not only before sleeping: a producer at its limit would otherwise wait for
            # as long as other producers keep the socket busy, and forever once nothing else arrives.
            self._flush_acks()
            if self._drain():
                if not self._ready and deadline is not None and time.monotonic() >= deadline:
                    break  # a steady stream of dropped frames must not hold recv past its timeout
                continue
            wait_ms = -1 if deadline is None else min(_MAX_WAIT_MS, max(0, math.ceil(
                (deadline - time.monotonic()) * 1000)))
            if wait_ms != self._rcvtimeo:
                self._sock.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._rcvtimeo = wait_ms
            try:
                route = self._sock.recv()
            except zmq.Again:
                if deadline is not None and time.monotonic() < deadline:
                    continue
                break
            self._take(route)
            self._drain()
        if not self._ready:
            raise TimeoutError(f"GroupReceiver on {self.endpoint}: nothing arrived within {timeout} s")

    def _drain(self) -> int:
        """Take the messages already queued, at most _DRAIN_BATCH; how many there were."""
        for taken in range(_DRAIN_BATCH):
            try:
                route = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return taken
            self._take(route)
        return _DRAIN_BATCH

    def _take(self, route: bytes) -> None:
        # The rest of a multipart message is queued with its first frame, so this read never waits.
        frame = self._sock.recv(copy=False)
        if frame.more:
            extra = 1
            while self._sock.getsockopt(zmq.RCVMORE):
                self._sock.recv(copy=False)
                extra += 1
            self._drop(route, frame, "multipart", f"a message of {1 + extra} frames, expected 1")
            return
        if route not in self._routes and len(frame.buffer) > MAX_HELLO_BYTES:
            # Only a Hello is admitted from this connection, and a Hello is small: nothing larger is decoded.
            self._drop(route, frame, "no_hello", f"a frame of {len(frame.buffer)} bytes before any Hello")
            return
        state = self._routes.get(route)
        if self._curve and state is not None and frame.get("User-Id") != state.producer:
            # A connection with another producer's key took this routing id over (ROUTER_HANDOVER): not
            # the session's producer, whatever its frames say. The session itself did nothing wrong.
            self._drop(route, frame, "wrong_key", f"a frame on the session of producer {state.producer!r}",
                       end=False)
            return
        try:
            msg = decode(frame.buffer)
        except msgspec.ValidationError as exc:  # msgpack, but not a message of ours (a wrong tag, a wrong type)
            # A list, string or bytes field over its wire limit (messages.py) is refused from its header.
            reason = "oversized" if "of length <=" in str(exc) else "invalid"
            self._drop(route, frame, reason, f"{len(frame.buffer)} bytes: {exc}")
            return
        except msgspec.DecodeError as exc:
            self._drop(route, frame, "undecodable", f"{len(frame.buffer)} bytes: {exc}")
            return
        if isinstance(msg, (RolloutGroup, RolloutError)):
            self._accept(route, frame, msg)
        elif isinstance(msg, Hello):
            self._hello(route, frame, msg)
        elif isinstance(msg, Goodbye):
            self._goodbye(route, frame, msg)
        elif isinstance(msg, (WeightsLoaded, Heartbeat)):
            self._control(route, frame, msg)
        else:
            self._drop(route, frame, "unexpected_type", f"a {type(msg).__name__}, which only the receiver sends")

    def _drop(self, route: bytes, frame: zmq.Frame | None, reason: str, detail: str, *, end: bool = True) -> None:
        count = self._dropped[reason] = self._dropped.get(reason, 0) + 1
        state = self._routes.get(route) if self._strict and end else None
        if state is not None:
            # The process that broke the protocol is told (it exits; a new process of it resumes where we stand).
            self._sock.send_multipart([route, encode(Stop(producer=state.producer, kind="session_ended",
                                                          reason=f"{detail} ({reason})"[:4096]))])
            end_session(self._routes, self._sessions.get(state.producer), route, state)
            if not state.route:
                self._unacked.discard(state.producer)
        if _is_log_count(count):
            # A session is named by its producer (what the learner's logs know it by), a stranger by its connection.
            log.warning("GroupReceiver on %s: dropped a frame from %s: %s (%s; %d so far)%s", self.endpoint,
                        f"producer {state.producer!r}" if state else peer_name(frame), detail, reason,
                        count, "; its session ended" if state else "")

    def _hello(self, route: bytes, frame: zmq.Frame, hello: Hello) -> None:
        if not hello.producer or len(hello.producer) > _MAX_NAME:
            self._drop(route, frame, "invalid", f"a Hello with producer name {hello.producer[:_MAX_NAME]!r}")
            return
        if self._curve and frame.get("User-Id") != hello.producer:
            # Identity is the key: a Hello as another producer (a live one's "restart" included) is an impostor's.
            self._drop(route, frame, "wrong_key", f"a Hello as {hello.producer!r}", end=False)
            return
        state = self._routes.get(route)
        if state is not None and state.producer != hello.producer:
            self._drop(route, frame, "wrong_producer", f"a Hello as {hello.producer!r} on the connection of "
                                                       f"producer {state.producer!r}")
            return
        if state is None:
            state = self._producers.get(hello.producer)
            if state is None:
                if self._shards and hello.producer not in self._shards:
                    known = ", ".join(sorted(self._shards)[:8])
                    why = (f"this learner assigns shards to {known}{' ...' if len(self._shards) > 8 else ''}, "
                           f"not to {hello.producer!r}")
                    self._sock.send_multipart([route, encode(Stop(producer=hello.producer, kind="unknown_producer",
                                                                  reason=why))])
                    self._drop(route, frame, "unknown_producer", why)
                    return
                if len(self._producers) >= self._max_producers:
                    self._drop(route, frame, "too_many_producers", f"a Hello of producer {hello.producer!r} past "
                                                                   f"the {self._max_producers} producers allowed")
                    return
                start = self._start_seqs.get(hello.producer, 0)
                state = self._producers[hello.producer] = ProducerStats(producer=hello.producer, next_seq=start,
                                                                        consumed=start)
            state.sessions += 1
            self._routes[route] = state
            sessions = self._sessions.setdefault(state.producer, deque())
            sessions.append(route)
            if len(sessions) > _MAX_SESSIONS:
                self._routes.pop(sessions.popleft(), None)
            if state.sessions > 1:
                log.info("producer %r restarted (pid %d, %s): resumes at %d", hello.producer, hello.pid,
                         peer_name(frame), state.next_seq)
        state.last_seen = time.monotonic()
        state.route = route
        state.weight_version = hello.weight_version
        self._send_credit(state)
        if self._weights is not None:
            self._sock.send_multipart([route, encode(self._weights)])

    def _control(self, route: bytes, frame: zmq.Frame, msg: WeightsLoaded | Heartbeat) -> None:
        """A session's WeightsLoaded (its engine runs that version now) or Heartbeat (its process runs)."""
        state = self._routes.get(route)
        what = type(msg).__name__
        if state is None:
            self._drop(route, frame, "no_hello", f"a {what} before its Hello")
        elif state.producer != msg.producer:
            self._drop(route, frame, "wrong_producer", f"a {what} of {msg.producer[:_MAX_NAME]!r} on the "
                                                       f"connection of producer {state.producer!r}")
        else:
            state.last_seen = time.monotonic()
            if isinstance(msg, WeightsLoaded):
                state.weight_version = max(state.weight_version, msg.version)

    def _goodbye(self, route: bytes, frame: zmq.Frame, goodbye: Goodbye) -> None:
        state = self._routes.get(route)
        if state is None:
            # Its producer was talking to a receiver before us (or is no producer): we cannot vouch for what it sent.
            self._drop(route, frame, "no_hello", f"a Goodbye as {goodbye.producer!r} before any Hello")
            return
        if state.producer != goodbye.producer:
            self._drop(route, frame, "wrong_producer", f"a Goodbye as {goodbye.producer!r} on the connection of "
                                                       f"producer {state.producer!r}")
            return
        # Sent on the closing session's route (not state.route, which a restarted process may own by now).
        self._sock.send_multipart([route, encode(self._credit(state, limit=state.granted))])

    def _accept(self, route: bytes, frame: zmq.Frame, msg: StreamMessage) -> None:
        state = self._routes.get(route)
        if state is None:
            # A session we never heard Hello from (or one of a producer's sessions so old it was forgotten):
            # the name and sequence number in its body are only claims.
            self._drop(route, frame, "no_hello", f"{type(msg).__name__} {msg.prompt_id[:80]!r} as producer "
                                                 f"{msg.producer[:_MAX_NAME]!r} seq {msg.seq} before any Hello")
            return
        if state.producer != msg.producer:
            self._drop(route, frame, "wrong_producer", f"{type(msg).__name__} {msg.prompt_id[:80]!r} as producer "
                                                       f"{msg.producer[:_MAX_NAME]!r} on the connection of producer "
                                                       f"{state.producer!r}")
            return
        problem = shape_error(msg)
        if problem is not None:
            self._drop(route, frame, "invalid", f"{type(msg).__name__} {msg.prompt_id[:80]!r}: {problem}")
            return
        state.last_seen = time.monotonic()
        if self._shards:
            shard, num_shards = self._shards[state.producer]
            if msg.position != msg.seq * num_shards + shard:
                self._drop(route, frame, "wrong_shard", f"{type(msg).__name__} {msg.prompt_id[:80]!r} (seq {msg.seq}) "
                                                        f"at stream position {msg.position}, but producer "
                                                        f"{state.producer!r} has shard {shard} of {num_shards}: "
                                                        f"seq {msg.seq} is position {msg.seq * num_shards + shard}")
                return
        if msg.seq < state.next_seq:
            state.duplicates += 1
            return
        if msg.seq >= state.granted:
            self._drop(route, frame, "over_credit", f"seq {msg.seq} of producer {state.producer!r}, at or past its "
                                                    f"credit limit {state.granted}")
            return
        if self._strict:
            violation = strict_violation(msg, state.next_seq, -1 if self._weights is None else self._weights.window)
            if violation is not None:
                self._drop(route, frame, *violation)
                return
        gap = msg.seq - state.next_seq
        state.lost += gap
        state.next_seq = msg.seq + 1
        state.buffered += 1
        state.max_buffered = max(state.max_buffered, state.buffered)
        self._received += 1
        if gap:
            log.warning("producer %r: %d message(s) lost before seq %d", msg.producer, gap, msg.seq)
            if self._on_gap == "raise":
                # raised by recv in stream order, after the messages before the gap were handed out
                self._ready.append(SequenceGap(msg.producer, msg.seq - gap, msg.seq))
        self._ready.append(msg)

    # -- outgoing credit

    def _credit(self, state: ProducerStats, limit: int) -> Credit:
        shard, num_shards = self._shards.get(state.producer, (0, 0))
        return Credit(producer=state.producer, credits=max(0, limit - state.next_seq), next_seq=state.next_seq,
                      consumer_version=0 if self._weights is None else self._weights.version,
                      window=self._credits, max_message_bytes=self._max_message_bytes, shard=shard,
                      num_shards=num_shards)

    def _send_credit(self, state: ProducerStats) -> None:
        state.pending_acks = 0
        self._unacked.discard(state.producer)
        if not state.route:
            return
        state.granted = state.consumed + self._credits
        self._sock.send_multipart([state.route, encode(self._credit(state, limit=state.granted))])

    def _flush_acks(self) -> None:
        # Only producers that have used up their credit wait for it; the others still have messages on
        # the way that will be consumed and acked. Each Credit wakes libzmq's I/O threads on both sides,
        # and on 2 busy cores an ack per wait cost ~40% of the throughput.
        for name in list(self._unacked):
            state = self._producers[name]
            if state.next_seq >= state.granted:
                self._send_credit(state)
