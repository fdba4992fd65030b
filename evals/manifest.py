"""The run manifest: `manifest.json` in a run folder says what produced the results beside it.

It holds the command, the full settings, and the environment (device, library versions, git commit,
date). The settings that change the answers (model, data selection, decoding, parser) form the run's
identity: resuming a folder with a different identity is refused, so one results file never mixes
two configurations. Settings that only change speed (device, batch size) may differ between attempts;
each attempt is appended to `attempts`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MANIFEST_NAME = "manifest.json"


def _identity(settings: dict, volatile: tuple[str, ...]) -> dict:
    out = {}
    for key, value in settings.items():
        if key in volatile:
            continue
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if f"{key}.{k}" not in volatile}
        out[key] = value
    return out


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} in the folder, {b!r} now")
    return lines


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST_NAME}; not a run folder")
    return json.loads(path.read_text())


def open_run(folder: str | Path, command: str, settings: dict, *, volatile: tuple[str, ...] = (),
             overwrite: bool = False) -> dict:
    """Create or resume the run folder and write its manifest; returns the manifest.

    `volatile` names settings (`key` or `section.key`) left out of the identity check.
    """
    from medvl_engine.benchmarking import environment

    folder = Path(folder)
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    identity = _identity(settings, volatile)
    attempt = {**environment(), "settings": settings}
    path = folder / MANIFEST_NAME
    if path.is_file():
        manifest = json.loads(path.read_text())
        if manifest.get("command") != command:
            raise ValueError(f"{folder} holds a {manifest.get('command')!r} run, not {command!r}; use another folder")
        changed = _diff(manifest.get("identity", {}), identity)
        if changed:
            raise ValueError(f"{folder} holds a run with other settings; resuming it would mix results "
                             f"({'; '.join(changed)}). Use another folder or --overwrite.")
        manifest["attempts"].append(attempt)
    elif any(p.name != MANIFEST_NAME for p in folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty and has no {MANIFEST_NAME}; use another folder or --overwrite")
    else:
        manifest = {"command": command, "identity": identity, "attempts": [attempt]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return manifest
