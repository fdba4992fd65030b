"""CURVE keys of the transport: `medvl-engine keys DIR` writes them; GroupReceiver and GroupSender load them.

ZeroMQ's CURVE mechanism encrypts a tcp connection and authenticates both ends. The folder holds two key
pairs in ZeroMQ's certificate format:
- `server.key` / `server.key_secret`: the receiver's (the learner). Producers load `server.key` and so
  talk only to the learner that holds the secret half.
- `client.key` / `client.key_secret`: the producers' (the rollout workers). The receiver accepts only
  connections that prove they hold `client.key_secret`; anything else fails the handshake before a
  single frame reaches the channel.
Copy the folder to every node of the run (it holds both secrets: the folder is 0700, the secret files 0600).

When CURVE is on (`use_curve`): a tcp endpoint that other hosts can reach (any address but loopback:
`tcp://0.0.0.0:5555`, `tcp://*:5555`, `tcp://learner:5555`) always; loopback tcp only when a key folder
is given; ipc never (the socket file is owner-only instead). The folder comes from the `keys=` argument,
else from the environment variable MEDVL_TRANSPORT_KEYS, read when the socket is made: rollout workers
started by the learner inherit it.

Run: medvl-engine keys DIR [--force]
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
SERVER, CLIENT = "server", "client"
_NETWORK_TRANSPORTS = {"tcp", "ws", "wss", "udp", "pgm", "epgm", "norm", "tipc", "vmci"}
KEYS_HINT = "create them with `medvl-engine keys DIR`, then pass keys=DIR or set MEDVL_TRANSPORT_KEYS=DIR"


@dataclass(frozen=True)
class ServerKeys:
    """What the receiver needs: its own key pair and the public key producers must prove they hold."""

    public: bytes
    secret: bytes
    client_public: bytes


@dataclass(frozen=True)
class ClientKeys:
    """What a producer needs: the receiver's public key and the producers' key pair."""

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


def use_curve(endpoint: str, folder: Path | None, curve: bool | None) -> bool:
    """`curve` when given; otherwise on for endpoints other hosts can reach, and for loopback tcp with keys.
    Both ends apply the same rule to the same settings, so they agree."""
    if curve is not None:
        return curve
    if endpoint.startswith(("ipc://", "inproc://")):
        return False
    return folder is not None or reachable_from_other_hosts(endpoint)


def curve_folder(endpoint: str, keys: str | os.PathLike | None, curve: bool | None, who: str) -> Path | None:
    """The key folder when a socket on `endpoint` uses CURVE, None when it does not; a ValueError that says
    what to do when it must and no folder was given."""
    folder = keys_folder(keys)
    if not use_curve(endpoint, folder, curve):
        return None
    if folder is None:
        reason = "CURVE was asked for" if curve else "other hosts can reach it, so it needs CURVE keys"
        raise ConfigError(f"{who}: {endpoint}: {reason}, and none were given ({KEYS_HINT})")
    return folder


def create_keys(folder: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """Write both key pairs into `folder` (made 0700); returns the files written."""
    folder = Path(folder)
    names = [f"{role}.{suffix}" for role in (SERVER, CLIENT) for suffix in ("key", "key_secret")]
    existing = [name for name in names if (folder / name).exists()]
    if existing and not force:
        raise FileExistsError(f"{folder} already holds {', '.join(existing)}: every node of a run must share "
                              f"the same keys, so they are not replaced without --force")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)  # before a secret is written: nobody else may list or open it
    written = []
    for role in (SERVER, CLIENT):
        public, secret = zmq.auth.create_certificates(folder, role)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
        written += [Path(public), Path(secret)]
    return written


def load_server_keys(folder: Path, who: str) -> ServerKeys:
    public, secret = _load(folder / f"{SERVER}.key_secret", who, secret=True)
    client_public, _ = _load(folder / f"{CLIENT}.key", who, secret=False)
    return ServerKeys(public=public, secret=secret, client_public=client_public)


def load_client_keys(folder: Path, who: str) -> ClientKeys:
    server_public, _ = _load(folder / f"{SERVER}.key", who, secret=False)
    public, secret = _load(folder / f"{CLIENT}.key_secret", who, secret=True)
    return ClientKeys(server_public=server_public, public=public, secret=secret)


def _load(path: Path, who: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    if not zmq.has("curve"):
        raise RuntimeError(f"{who}: this libzmq was built without CURVE support")
    if not path.is_file():
        raise FileNotFoundError(f"{who}: CURVE key file {path} is missing ({KEYS_HINT})")
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
    """Write the CURVE key pairs of the learner (server.key*) and of the rollout workers (client.key*) for tcp
    transport; copy the folder to every node of the run and pass it as transport.keys or MEDVL_TRANSPORT_KEYS."""

    folder: str = param(help="folder to write the keys into (created with mode 0700)", positional=True)
    force: bool = param(False, "replace keys already in the folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medvl_engine import config as config_lib

    parser.description = (KeysConfig.__doc__ or "").replace("\n    ", " ").strip()
    config_lib.add_arguments(parser, KeysConfig, config_flag=False)


def main(args: argparse.Namespace) -> int:
    from medvl_engine import config as config_lib

    args = config_lib.from_args(KeysConfig, args)
    written = create_keys(args.folder, force=args.force)  # an existing set: one error line (cli), exit 2
    for path in written:
        print(path)
    print(f"on every node: export {KEYS_ENV}={Path(args.folder).resolve()}")
    return 0
