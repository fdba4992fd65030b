"""Run configs as nested dataclasses: command-line flags derived from the fields, YAML/TOML files, overrides.

A run config is a dataclass whose fields are component dataclasses (`model`, `optim`, ...), each
checked in its own `__post_init__`. `add_arguments(parser, RunConfig)` derives one flag per leaf field
(`--optim.lr 1e-6`, `--grpo.clip-high 0.28`, `--model.gradient-checkpointing/--no-...`) plus
`--config FILE` and `--dry-run`; `from_args(RunConfig, args)` builds the config from the file (if any) with
the given flags on top. No parallel argparse: adding a field adds its flag. With `--dry-run`, `from_args`
prints the resolved, checked config as YAML and exits 0 before the command starts anything.

    cfg = load(RunConfig, "run.yaml", overrides={"optim": {"lr": 2e-6}})
    save(cfg, "run_dir/config.yaml")

Renamed settings: a config class may map old key paths to new ones, `RENAMED = {"logging.run_dir": "output"}`.
For one release the old spelling still works, in a config file (`logging: {run_dir: X}`) and as a hidden flag
(`--logging.run-dir X`), with a warning naming the new one; an old and a new key with different values are
refused. Dumps (`to_dict`, `--dry-run`, a run's config.yaml) write only the new spelling. A section class may
name a `SHORTHAND` field: a plain value given for the section means that field (`model: PATH`, `--model PATH`
is `model.path`). A field made with `param(..., saved=False)` (a run's switches: `resume`, `overwrite`) is
left out of every dump, so `--config RUN/config.yaml` starts a run, never resumes one by itself.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from medvl_engine.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")


def param(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
          positional: bool = False, saved: bool = True) -> Any:
    """A dataclass field with the help text its command-line flag shows.

    `positional=True` makes it a positional argument (`medvl-engine score ANSWERS`) instead of a flag.
    `saved=False`: a switch of this invocation (`--resume`), not a setting of the run: `to_dict`, `dump` and
    `save` leave it out.
    """
    metadata = {"help": help, "positional": positional, "saved": saved}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _flag(prefix: str, name: str) -> str:
    return "--" + (f"{prefix}." if prefix else "") + name.replace("_", "-")


def _dest(prefix: str, name: str) -> str:
    return (f"{prefix}." if prefix else "") + name


def renamed(cls: type) -> dict[str, str]:
    """The old key paths of `cls` (relative to it, dotted) and the new ones they mean: its `RENAMED`."""
    return dict(getattr(cls, "RENAMED", {}) or {})


def _shorthand(cls: type) -> str | None:
    """The field a plain value given for the section `cls` means (`model: PATH` -> `model.path`), if any."""
    return getattr(cls, "SHORTHAND", None)


def _flag_of(key: str) -> str:
    return "--" + key.replace("_", "-")


def _pop_path(data: dict[str, Any], path: str) -> tuple[bool, Any]:
    """Remove the dotted key `path` from the nested dicts `data` (copied on the way); (found, value)."""
    head, _, rest = path.partition(".")
    if head not in data:
        return False, None
    if not rest:
        return True, data.pop(head)
    if not isinstance(data[head], dict):
        return False, None
    data[head] = dict(data[head])
    found, value = _pop_path(data[head], rest)
    if found and not data[head]:
        del data[head]  # the section held only the old key
    return found, value


def _get_path(data: dict[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node[p] = dict(node.get(p) or {})
        node = node[p]
    node[leaf] = value


def normalize(cls: type, data: Any, *, where: str = "config", _prefix: str = "") -> Any:
    """`data` with the old spellings of `cls` (and of its sections) moved to the new ones, with a warning
    naming the new spelling, and a plain value for a section with a `SHORTHAND` field expanded to
    `{field: value}`. An old and a new key given with different values are refused. `data` is not changed."""
    if not isinstance(data, dict) or not _is_dataclass_type(cls):
        return data
    hints = _hints(cls)
    sections = [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if _is_dataclass_type(hints[f.name])]

    def expand(data: dict[str, Any]) -> None:
        for name, tp in sections:
            value = data.get(name)
            if _shorthand(tp) and value is not None and not isinstance(value, dict):
                data[name] = {_shorthand(tp): value}

    data = dict(data)
    expand(data)
    for old, new in renamed(cls).items():
        found, value = _pop_path(data, old)
        if not found:
            continue
        old_key, new_key = _dest(_prefix, old), _dest(_prefix, new)
        has_new, current = _get_path(data, new)
        if has_new and current != value:
            raise ConfigError(f"{where}: `{old_key}` ({_flag_of(old_key)}) is the old spelling of `{new_key}` "
                              f"({_flag_of(new_key)}), and both are given with different values "
                              f"({old_key}={value!r}, {new_key}={current!r}); give only `{new_key}`")
        logger.warning("%s: `%s` (%s) is deprecated and will be removed in the next release: use `%s` (%s)",
                       where, old_key, _flag_of(old_key), new_key, _flag_of(new_key))
        _set_path(data, new, value)
    expand(data)
    for name, tp in sections:
        if name in data:
            data[name] = normalize(tp, data[name], where=where, _prefix=_dest(_prefix, name))
    return data


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, config_flag: bool = True) -> None:
    """Add `--config FILE`, `--dry-run` and one flag per leaf field of the (nested) dataclass `cls`.

    Flags default to "not given", so only what the user typed overrides the file and the defaults.
    """
    if config_flag:
        parser.add_argument("--config", default=None, help="YAML or TOML file with the run config")
        parser.add_argument("--dry-run", action="store_true",
                            help="load and check the config, print it resolved as YAML and exit (starts no model, "
                                 "writes nothing)")
    _add_fields(parser, cls, "", None)


def field_default(f: dataclasses.Field, owner: Any = None) -> Any:
    """The value a field takes when nothing sets it: the owner instance's (a parent's default_factory may
    differ from the section class's own defaults, e.g. SFT's optimizer), else the field's default."""
    if owner is not None:
        return getattr(owner, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _field_at(cls: type, path: str) -> tuple[Any, dataclasses.Field]:
    """The type and field of the dotted key `path` of `cls`."""
    head, _, rest = path.partition(".")
    f = {f.name: f for f in dataclasses.fields(cls)}[head]
    tp = _hints(cls)[head]
    return _field_at(tp, rest) if rest else (tp, f)


def _add_renamed_flags(parser: argparse.ArgumentParser, cls: type, prefix: str) -> None:
    """Hidden flags for the old spellings of `cls`: `--logging.run-dir X` gives `logging.run_dir`, which
    `normalize` moves to the new key with its warning (and refuses beside a different new value)."""
    for old, new in renamed(cls).items():
        tp, _ = _field_at(cls, new)
        inner, optional = _unwrap_optional(tp)
        kwargs: dict[str, Any] = {"dest": _dest(prefix, old), "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_dataclass_type(inner) and _shorthand(inner):
            kwargs["type"] = str
        elif inner in (int, float, str):
            kwargs["type"] = _optional_parser(inner) if optional else inner
        else:
            raise TypeError(f"{cls.__name__}.RENAMED: no command-line flag for {old} -> {new} of type {tp!r}")
        parser.add_argument(_flag(prefix, old), **kwargs)


def _add_fields(parser: argparse.ArgumentParser, cls: type, prefix: str, owner: Any) -> None:
    hints = _hints(cls)
    group = parser if not prefix else parser.add_argument_group(prefix, (cls.__doc__ or "").strip().split("\n")[0])
    _add_renamed_flags(parser, cls, prefix)
    short = _shorthand(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = field_default(f, owner)
        if _is_dataclass_type(tp):
            _add_fields(parser, tp, _dest(prefix, f.name), default)
            continue
        help_ = f.metadata.get("help", "")
        shown = "required" if default is dataclasses.MISSING else f"default: {default!r}"
        kwargs: dict[str, Any] = {"dest": _dest(prefix, f.name), "default": argparse.SUPPRESS,
                                  "help": f"{help_} ({shown})" if help_ else f"({shown})"}
        if f.metadata.get("positional"):
            inner, _ = _unwrap_optional(tp)
            kwargs.pop("dest")
            if typing.get_origin(inner) in (tuple, list):
                kwargs["nargs"] = "+" if default is dataclasses.MISSING or not default else "*"
            elif default is not dataclasses.MISSING:
                kwargs["nargs"] = "?"
            kwargs["metavar"] = f.name.upper()
            group.add_argument(_dest(prefix, f.name), **kwargs)
            continue
        inner, optional = _unwrap_optional(tp)
        origin = typing.get_origin(inner)
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            choices = typing.get_args(inner)
            kwargs["choices"] = list(choices)
            kwargs["type"] = type(choices[0])
        elif origin in (tuple, list):
            args = typing.get_args(inner)
            elem = args[0] if args else str
            kwargs["type"] = elem
            kwargs["nargs"] = len(args) if origin is tuple and Ellipsis not in args else "*"
            kwargs["metavar"] = elem.__name__.upper()
        elif inner in (int, float, str):
            kwargs["type"] = _optional_parser(inner) if optional else inner
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line flag for type {tp!r}")
        flags = [_flag(prefix, f.name)]
        if prefix and f.name == short:
            flags.append("--" + prefix)  # --model PATH: the section's shorthand
        group.add_argument(*flags, **kwargs)


def _optional_parser(tp: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else tp(text)

    parse.__name__ = tp.__name__
    return parse


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build `cls` from `--config FILE` (if given) with the command-line flags on top.

    With `--dry-run` the checked config is printed as YAML and `SystemExit(0)` raised, as argparse does
    for `--help`: every command calls this first, so a dry run never reaches a model, DeepSpeed or the
    run folder.
    """
    cfg = _from_args(cls, args)
    if getattr(args, "dry_run", False):
        print(dump(cfg), end="", flush=True)
        raise SystemExit(0)
    return cfg


def _from_args(cls: type[T], args: argparse.Namespace) -> T:
    known = {f.name for f in dataclasses.fields(cls)} | {old.split(".")[0] for old in renamed(cls)}
    overrides: dict[str, Any] = {}
    for key, value in vars(args).items():
        head = key.split(".")[0]
        if head not in known:
            continue  # flags of the command itself (e.g. --resume), not config fields
        node = overrides
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return load(cls, getattr(args, "config", None), overrides=overrides)


def read_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib  # Python >= 3.11

        data = tomllib.loads(text)
    elif suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif suffix == ".json":
        data = json.loads(text)
    else:
        raise ConfigError(f"config file {path}: unknown format {suffix!r} (use .yaml, .yml, .toml or .json)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values of `top` win; nested mappings merge key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load(cls: type[T], path: str | Path | None = None, *, overrides: dict[str, Any] | None = None) -> T:
    """Defaults of `cls`, then the file at `path`, then `overrides`; checked by every `__post_init__`.

    Each layer has its old spellings moved to the new ones first, so a flag in the new spelling overrides a
    file in the old one (and `model: PATH` in a file keeps its path beside `--model.dtype`).
    """
    where = str(path) if path else "config"
    data = normalize(cls, read_file(path), where=where) if path else {}
    data = merge(data, normalize(cls, overrides or {}, where="command line"))
    return build(cls, data, where=where)


def build(cls: type[T], data: dict[str, Any], *, where: str = "config") -> T:
    """Instantiate the (nested) dataclass `cls` from a dict, naming the key path of any bad entry."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    data = normalize(cls, data, where=where)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__} (known: {sorted(fields)})")
    missing = [name for name, f in fields.items() if name not in data and field_default(f) is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {[f'{where}.{m}' for m in missing]}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        path = f"{where}.{name}"
        if _is_dataclass_type(tp):
            # A partial section overrides the parent's default for it (SFTConfig's optimizer
            # defaults differ from OptimConfig's), not the section class's own defaults. Only the keys
            # where the two differ are carried over: a field whose default the section resolves from its
            # other fields (AlgoConfig's clip range follows its loss) stays unset unless given.
            f = fields[name]
            if f.default_factory is not dataclasses.MISSING and isinstance(value, dict):
                value = merge(_overridden_defaults(f.default_factory(), tp), value)
            kwargs[name] = build(tp, value, where=path)
        else:
            kwargs[name] = _coerce(tp, value, path)
    return cls(**kwargs)


def _overridden_defaults(default: Any, cls: type) -> dict[str, Any]:
    """The settings of the section instance `default` that differ from a bare `cls()`'s (nested sections
    likewise); all of them when a bare `cls()` cannot be built (required fields)."""
    try:
        bare = to_dict(cls())
    except (TypeError, ConfigError):
        return to_dict(default)

    def diff(given: dict, base: dict) -> dict:
        out = {}
        for key, value in given.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                value = diff(value, base[key])
                if value:
                    out[key] = value
            elif key not in base or base[key] != value:
                out[key] = value
        return out

    return diff(to_dict(default), bare)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: may not be null")
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = [a for a in typing.get_args(inner) if a is not Ellipsis]
        if origin is tuple and Ellipsis not in typing.get_args(inner) and len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        elem = args[0] if args else Any
        items = [_coerce(elem, v, f"{where}[{i}]") if elem is not Any else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if inner is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if inner is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-6" (no dot) as a string
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if inner in (int, str) and isinstance(value, inner) and not isinstance(value, bool):
        return value
    if inner is Any:
        return value
    raise ConfigError(f"{where}: expected {getattr(inner, '__name__', inner)}, got {value!r}")


def to_dict(cfg: Any, *, switches: bool = False) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars (tuples become lists), ready for YAML or JSON; fields made
    with `param(saved=False)` (a run's switches, e.g. `resume`) are left out unless `switches` (a copy of
    the whole config to build another from, as `medvl_engine.api` does)."""
    def plain(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                    if switches or f.metadata.get("saved", True)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return copy.deepcopy(value)

    return plain(cfg)


def dump(cfg: Any) -> str:
    """The config as YAML text, fields in declaration order; `build(type(cfg), yaml.safe_load(text))` is equal
    (but for the `saved=False` switches, which it leaves out)."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Any, path: str | Path) -> Path:
    """Write the config as YAML (or JSON for a .json path); `load(type(cfg), path)` reads it back equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    else:
        path.write_text(dump(cfg))
    return path
