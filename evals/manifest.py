"""The run manifest: `manifest.json` in a run folder says what produced the results beside it.

It holds the command, the full settings, and the environment (device, library versions, git commit,
date). The settings that change the answers (model, data selection, decoding, parser) form the run's
identity: resuming a folder with a different identity is refused, so one results file never mixes
two configurations. Settings that only change speed (device, batch size) may differ between attempts;
each attempt is appended to `attempts`.

`--overwrite` never loses a user's data: it removes only a folder this engine wrote (its manifest is
there and names the same command), only once the inputs have been checked, and never a folder that
is, holds or lies inside one of the run's inputs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from medvl_engine import run_folder
from medvl_engine.errors import ConfigError, RunFolderError
from medvl_engine.files import write_atomically

MANIFEST_NAME = run_folder.MANIFEST


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


def _recorded_identity(manifest: dict, volatile: tuple[str, ...]) -> dict:
    """The folder's identity. A setting it leaves out (one that counted as volatile when the folder was
    written, as hf's `rollout.max_batch` once did) is taken from the settings of its last attempt."""
    attempts = manifest.get("attempts") or [{}]
    out = _identity(attempts[-1].get("settings", {}), volatile)
    for key, value in manifest.get("identity", {}).items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise RunFolderError(f"{folder}: no {MANIFEST_NAME}; not a run folder")
    return json.loads(path.read_text())


def check_not_input(output: str | Path, inputs: Iterable[str | Path | None], *, flag: str = "--output") -> None:
    """Refuse an output folder that is one of `inputs`, lies inside one or holds one (writing there, or
    replacing it, would destroy the input). Inputs that are not paths here (a hub name, `bundled`) are skipped."""
    out = Path(output).resolve()
    for given in inputs:
        if not given or not Path(given).exists():
            continue
        path = Path(given).resolve()
        if out == path:
            how = "is"
        elif path in out.parents:
            how = "lies inside"
        elif out in path.parents:
            how = "holds"
        else:
            continue
        raise ConfigError(f"{flag} {output} {how} the input {given}; choose an output folder apart from the inputs")


def clear_for_overwrite(folder: str | Path, *, command: str, marker: str = MANIFEST_NAME) -> None:
    """`--overwrite`: remove `folder` when medvl-engine wrote it (its `marker` file is there; a manifest must
    also name `command`). An absent or empty folder is left as it is; any other folder is refused untouched."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise RunFolderError(f"--overwrite: {folder} is a file, not a run folder; choose another output")
    if not any(folder.iterdir()):
        return
    if not (folder / marker).is_file():
        raise RunFolderError(f"--overwrite: {folder} has no {marker}, so medvl-engine did not write it; "
                             "remove it yourself or choose another output")
    if marker == MANIFEST_NAME:
        written_by = read_manifest(folder).get("command")
        if written_by != command:
            raise RunFolderError(f"--overwrite: {folder} holds a {written_by!r} run, not {command!r}; "
                                 "remove it yourself or choose another output")
    shutil.rmtree(folder)


def _holds_results(folder: Path) -> bool:
    """Whether anything besides the manifest holds data (a results file with at least one answer)."""
    return any(p.is_file() and p.name != MANIFEST_NAME and p.stat().st_size > 0 for p in folder.rglob("*"))


def open_run(folder: str | Path, command: str, settings: dict, *, volatile: tuple[str, ...] = (),
             overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> dict:
    """Create or resume the run folder and write its manifest; returns the manifest.

    `volatile` names settings (`key` or `section.key`) left out of the identity check. `inputs` are the
    paths the run reads (model, data): the folder may not be, hold or lie inside one. Call this once the
    inputs have been checked (loaded or resolved): `overwrite` removes an earlier run of `command` first.
    """
    from medvl_engine.benchmarking import environment

    folder = Path(folder)
    check_not_input(folder, inputs)
    if overwrite:
        clear_for_overwrite(folder, command=command)
    folder.mkdir(parents=True, exist_ok=True)
    identity = _identity(settings, volatile)
    attempt = {**environment(), "settings": settings}
    path = folder / MANIFEST_NAME
    if path.is_file():
        manifest = json.loads(path.read_text())
        if manifest.get("command") != command:
            raise RunFolderError(f"{folder} holds a {manifest.get('command')!r} run, not {command!r}; "
                                 "use another folder")
        changed = _diff(_recorded_identity(manifest, volatile), identity)
        if changed and not _holds_results(folder):
            # An earlier attempt that stopped before its first answer (a wrong flag, a model that would not
            # load): nothing to mix, the corrected command starts the run afresh.
            manifest = {"command": command, "identity": identity, "attempts": []}
            changed = []
        if changed:
            raise RunFolderError(f"{folder} holds a run with other settings; resuming it would mix results "
                                 f"({'; '.join(changed)}). Use another folder or --overwrite.")
        manifest["identity"] = identity
        manifest["attempts"].append(attempt)
    elif any(p.name != MANIFEST_NAME for p in folder.iterdir()):
        raise RunFolderError(f"{folder} is not empty and has no {MANIFEST_NAME}; use another folder or --overwrite")
    else:
        manifest = {"command": command, "identity": identity, "attempts": [attempt]}
    write_atomically(path, json.dumps(manifest, indent=2) + "\n")
    return manifest
