"""Checks the environment the test command and the demo run in, or writes a lock from it.

    python scripts/check_env.py --lock scripts/lock-main.txt     # fail, naming each package, when wrong
    python scripts/check_env.py --freeze                         # print the installed set as a lock

The check fails loudly before pytest starts, instead of as a collection of import errors: a package
whose version differs from the lock, a `medvl_engine` imported from another checkout, a stale or
missing native extension, a folder of this checkout that shadows an installed distribution.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = "medvl-engine"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """`name==version` lines (comments and blank lines aside), keyed by canonical name."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise SystemExit(f"{path}:{number}: expected 'name==version', got {line!r}")
        pins[canonical(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), dist.version)
    return found


def public(version: str) -> str:
    return version.split("+", 1)[0]  # torch 2.13.0+cpu is the lock's 2.13.0


def freeze() -> str:
    skip = {OURS, "pip", "setuptools", "wheel"}
    lines = [f"{name}=={public(version)}" for name, version in sorted(installed().items()) if name not in skip]
    return "\n".join(lines) + "\n"


def in_checkout(path: str) -> bool:
    """A file of the checkout, not of an environment that happens to live inside it (./.venv)."""
    resolved = Path(path).resolve()
    return resolved.is_relative_to(ROOT) and "site-packages" not in resolved.parts


def shadowed_names() -> list[str]:
    """Installed distributions' top-level names that would import from this checkout's root instead."""
    bad = []
    saved = list(sys.path)
    sys.path.insert(0, str(ROOT))  # as `python -m` and pytest put the working directory first
    try:
        for name, dists in sorted(metadata.packages_distributions().items()):
            if not name.isidentifier() or OURS in {canonical(d) for d in dists} or name in sys.modules:
                continue
            spec = importlib.util.find_spec(name)
            places = [spec.origin] if spec and spec.origin else []
            places += list(spec.submodule_search_locations or []) if spec else []
            if any(in_checkout(p) for p in places if p and p != "namespace"):
                bad.append(name)
    finally:
        sys.path[:] = saved
    return bad


def check(lock: Path) -> list[str]:
    problems = []
    have = installed()
    for name, version in read_lock(lock).items():
        if name in have and public(have[name]) != version:
            problems.append(f"{name} {have[name]} is installed, the lock ({lock.name}) pins {version}")
    try:
        import medvl_engine
    except ImportError as exc:
        return problems + [f"medvl_engine does not import: {exc}"]
    where = Path(medvl_engine.__file__).resolve()
    if not where.is_relative_to(ROOT):
        problems.append(f"medvl_engine imports from {where.parent}, not from this checkout ({ROOT}): "
                        "deactivate that environment or install this checkout into it")
    try:
        importlib.import_module("medvl_engine._native")
    except ImportError as exc:
        problems.append(f"the native extension does not import: {exc}")
    problems += [f"the checkout's folder {name!r} shadows the installed distribution of that name"
                 for name in shadowed_names()]
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, help="the lock (constraints) file this environment was installed with")
    parser.add_argument("--freeze", action="store_true", help="print the installed packages as a lock")
    args = parser.parse_args()
    if args.freeze:
        sys.stdout.write(freeze())
        return
    problems = check(args.lock)
    if problems:
        print(f"the environment {sys.prefix} is not the one the tests were written for:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
