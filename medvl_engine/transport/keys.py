"""CURVE keys of the transport: `medvl-engine keys DIR --workers N` writes them; GroupReceiver and GroupSender
load them.

ZeroMQ's CURVE mechanism encrypts a tcp connection and authenticates both ends. Identity is a key, not a
name: every producer has a key pair of its own, and the file name of its public key is the one producer id
that key may use. The folder holds, in ZeroMQ's certificate format:
- `server.key` / `server.key_secret`: the receiver's (the learner). Producers load `server.key` and so
  talk only to the learner that holds the secret half.
- `rollout-0.key` / `rollout-0.key_secret`, `rollout-1.key` ...: one pair per rollout worker. The receiver
  admits a connection only with one of these public keys (ZAP), tags every frame of it with the key's
  producer id (the ZAP User-Id), and refuses a Hello, or any later frame, whose producer is not that id:
  a worker holding `rollout-1.key_secret` cannot speak for `rollout-0`, not even as its "restart".
A worker node needs `server.key` and its own pair; the learner node needs `server.key_secret` and every
`*.key` (copying the whole folder everywhere works too: it is 0700, the secret files 0600).

When CURVE is on (`use_curve`): every endpoint of a network transport (tcp, loopback included) unless the
run says `insecure` (named as unsafe in the help: any process that reaches the port is in, and can say it
is any producer); ipc never: its socket file is owner-only, so its trust boundary is the OS user. The
folder comes from the `keys=` argument, else from the environment variable MEDVL_TRANSPORT_KEYS, read when
the socket is made: rollout workers started by the learner inherit it.

Run: medvl-engine keys DIR [--workers N] [--force]
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from medvl_engine.config import param
from medvl_engine.errors import ConfigError

logger = logging.getLogger(__name__)

KEYS_ENV = "MEDVL_TRANSPORT_KEYS"
SERVER = "server"
_NETWORK_TRANSPORTS = {"tcp", "ws", "wss", "udp", "pgm", "epgm", "norm", "tipc", "vmci"}
KEYS_HINT = ("create them with `medvl-engine keys DIR --workers N`, then pass keys=DIR or set "
             "MEDVL_TRANSPORT_KEYS=DIR (or run with transport.insecure, which lets any process that reaches the "
             "port in)")


@dataclass(frozen=True)
class ServerKeys:
    """What the receiver needs: its own key pair, and the producer id each producer's public key may use."""

    public: bytes
    secret: bytes
    producers: dict[bytes, str]  # z85 public key -> producer id


@dataclass(frozen=True)
class ClientKeys:
    """What a producer needs: the receiver's public key and its own key pair."""

    server_public: bytes
    public: bytes
    secret: bytes


def keys_folder(keys: str | os.PathLike | None) -> Path | None:
    """The key folder to use: `keys`, else $MEDVL_TRANSPORT_KEYS, else None."""
    if keys is not None:
        return Path(keys)
    env = os.environ.get(KEYS_ENV, "")
    return Path(env) if env else None


def reachable_from_other_hosts(endpoint: str) -> bool:
    """Whether a peer on another machine could reach `endpoint`: ZeroMQ's network transports, tcp unless on
    loopback (a host name counts as reachable: it may resolve anywhere)."""
    scheme, _, address = endpoint.partition("://")
    if scheme != "tcp":
        return scheme in _NETWORK_TRANSPORTS
    host = address.rpartition(";")[2].rpartition(":")[0].strip("[]")  # "src;host:port" connects from src
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # "*", an interface name or a host name


def use_curve(endpoint: str, insecure: bool) -> bool:
    """CURVE on every endpoint of a network transport, loopback tcp included (any local user's process reaches
    it), unless the run says `insecure`; never on ipc or inproc, whose trust boundary is the OS user. Both
    ends apply the same rule to the same settings, so they agree."""
    return endpoint.partition("://")[0] in _NETWORK_TRANSPORTS and not insecure


def curve_folder(endpoint: str, keys: str | os.PathLike | None, insecure: bool, who: str) -> Path | None:
    """The key folder when a socket on `endpoint` uses CURVE, None when it does not; a ConfigError that says
    what to do when it must and no folder was given."""
    if not use_curve(endpoint, insecure):
        return None
    folder = keys_folder(keys)
    if folder is None:
        where = "other hosts can reach it" if reachable_from_other_hosts(endpoint) else \
            "every local user's processes can reach it"
        raise ConfigError(f"{who}: {endpoint}: {where}, so it needs CURVE keys, and none were given ({KEYS_HINT})")
    return folder


def create_keys(folder: str | os.PathLike, *, workers: int = 1, force: bool = False) -> list[Path]:
    """Write the receiver's key pair and one pair per worker (`rollout-0` ... `rollout-{workers-1}`) into
    `folder` (made 0700); returns the files written. Pairs already there are kept (a run that grows gets its
    new workers' keys), and replaced only with `force`."""
    from medvl_engine.run_folder import rollout_worker_name

    if workers < 1:
        raise ConfigError(f"keys: --workers must be >= 1, got {workers}")
    folder = Path(folder)
    roles = [SERVER] + [rollout_worker_name(i) for i in range(workers)]
    if (folder / f"{SERVER}.key_secret").exists() and not force and \
            all((folder / f"{role}.key_secret").exists() for role in roles):
        raise FileExistsError(f"{folder} already holds the keys of the learner and {workers} worker(s): every "
                              "node of a run must share the same keys, so they are not replaced without --force")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)  # before a secret is written: nobody else may list or open it
    written = []
    for role in roles:
        if (folder / f"{role}.key_secret").exists() and not force:
            continue
        public, secret = zmq.auth.create_certificates(folder, role)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
        written += [Path(public), Path(secret)]
    return written


def load_server_keys(folder: Path, who: str) -> ServerKeys:
    """The receiver's pair and every producer's public key (`*.key` but server.key) in `folder`."""
    public, secret = _load(folder / f"{SERVER}.key_secret", who, secret=True)
    producers: dict[bytes, str] = {}
    for path in sorted(folder.glob("*.key")):
        if path.stem == SERVER:
            continue
        key, _ = _load(path, who, secret=False)
        if key in producers:
            raise ConfigError(f"{who}: {path} holds the same public key as {producers[key]}.key: each producer "
                              f"needs a key pair of its own ({KEYS_HINT})")
        producers[key] = path.stem
    if not producers:
        raise ConfigError(f"{who}: {folder} holds no producer's public key (rollout-0.key ...); {KEYS_HINT}")
    return ServerKeys(public=public, secret=secret, producers=producers)


def load_client_keys(folder: Path, producer: str, who: str) -> ClientKeys:
    """The receiver's public key and producer `producer`'s own pair (`{producer}.key_secret`)."""
    server_public, _ = _load(folder / f"{SERVER}.key", who, secret=False)
    if "/" in producer or producer in (SERVER, "", ".", ".."):
        raise ConfigError(f"{who}: producer id {producer!r} cannot name a key file in {folder}")
    public, secret = _load(folder / f"{producer}.key_secret", who, secret=True)
    return ClientKeys(server_public=server_public, public=public, secret=secret)


def _load(path: Path, who: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    if not zmq.has("curve"):
        raise RuntimeError(f"{who}: this libzmq was built without CURVE support")
    if not path.is_file():
        raise ConfigError(f"{who}: CURVE key file {path} is missing ({KEYS_HINT})")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{who}: {path} is not a ZeroMQ key file ({exc}); {KEYS_HINT}") from exc
    if secret:
        if secret_key is None:
            raise ConfigError(f"{who}: {path} holds no secret key ({KEYS_HINT})")
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            logger.warning("%s: secret key file %s is readable by other users (chmod 600 it)", who, path)
    return public, secret_key


# ------------------------------------------------------------------------------------------------ CLI


@dataclass
class KeysConfig:
    """Write the CURVE key pairs of the learner (server.key*) and of each rollout worker (rollout-K.key*) for tcp
    transport; copy the folder to the nodes of the run and pass it as transport.keys or MEDVL_TRANSPORT_KEYS."""

    folder: str = param(help="folder to write the keys into (created with mode 0700)", positional=True)
    workers: int = param(1, "rollout workers: one key pair each, rollout-0 ... rollout-{N-1} (pairs already in the "
                         "folder are kept)")
    force: bool = param(False, "replace keys already in the folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medvl_engine import config as config_lib

    parser.description = (KeysConfig.__doc__ or "").replace("\n    ", " ").strip()
    config_lib.add_arguments(parser, KeysConfig, config_flag=False)


def main(args: argparse.Namespace) -> int:
    from medvl_engine import config as config_lib

    args = config_lib.from_args(KeysConfig, args)
    written = create_keys(args.folder, workers=args.workers, force=args.force)  # an existing set: one error line
    for path in written:
        print(path)
    print(f"on every node: export {KEYS_ENV}={Path(args.folder).resolve()}")
    return 0
