"""Who gets into the receiver at the door: the ZAP callback that lets a CURVE handshake finish only for
the holders of the run's client key, and the throttle that logs refusals the 1st, 10th, 100th ... time.

What the receiver admits frame by frame (a Hello first, one producer per connection, within its credit)
is `GroupReceiver`'s, in `receiver.py`; `protocol.py` documents it."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class _ClientKeyCheck:
    """The ZAP callback of a CURVE receiver (called in pyzmq's authenticator thread): only connections that
    hold the producers' key pair get in."""

    def __init__(self, client_public: bytes, endpoint: str) -> None:
        self.client_public = client_public
        self.endpoint = endpoint
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.client_public:
            return True
        self.refused += 1
        if _is_log_count(self.refused):
            log.warning("GroupReceiver on %s: refused a CURVE handshake with unknown client key %s (%d so far)",
                        self.endpoint, key.decode(errors="replace"), self.refused)
        return False


def _is_log_count(count: int) -> bool:
    """1, 10, 100, ...: a flood of bad frames is logged a handful of times, not once per frame."""
    return str(count).rstrip("0") == "1"
