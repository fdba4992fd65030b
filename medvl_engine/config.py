"""Run configs as nested dataclasses: command-line flags derived from the fields, YAML/TOML files, overrides.

A run config is a dataclass whose fields are component dataclasses (`model`, `optim`, ...), each
checked in its own `__post_init__`. `add_arguments(parser, RunConfig)` derives one flag per leaf field
(`--optim.lr 1e-6`, `--grpo.clip-high 0.28`, `--model.gradient-checkpointing/--no-...`) plus
`--config FILE` and `--dry-run`; `from_args(RunConfig, args)` builds the config from the file (if any) with
the given flags on top. No parallel argparse: adding a field adds its flag. With `--dry-run`, `from_args`
prints the resolved, checked config as YAML and exits 0 before the command starts anything.

    cfg = load(RunConfig, "run.yaml", overrides={"optim": {"lr": 2e-6}})
    save(cfg, "run_dir/config.yaml")
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def param(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
          positional: bool = False) -> Any:
    """A dataclass field with the help text its command-line flag shows.

    `positional=True` makes it a positional argument (`medvl-engine score ANSWERS`) instead of a flag.
    """
    metadata = {"help": help, "positional": positional}
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


def _add_fields(parser: argparse.ArgumentParser, cls: type, prefix: str, owner: Any) -> None:
    hints = _hints(cls)
    group = parser if not prefix else parser.add_argument_group(prefix, (cls.__doc__ or "").strip().split("\n")[0])
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
        group.add_argument(_flag(prefix, f.name), **kwargs)


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
    known = {f.name for f in dataclasses.fields(cls)}
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
        raise ValueError(f"config file {path}: unknown format {suffix!r} (use .yaml, .yml, .toml or .json)")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
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
    """Defaults of `cls`, then the file at `path`, then `overrides`; checked by every `__post_init__`."""
    data = read_file(path) if path else {}
    data = merge(data, overrides or {})
    return build(cls, data, where=str(path) if path else "config")


def build(cls: type[T], data: dict[str, Any], *, where: str = "config") -> T:
    """Instantiate the (nested) dataclass `cls` from a dict, naming the key path of any bad entry."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__} (known: {sorted(fields)})")
    missing = [name for name, f in fields.items() if name not in data and field_default(f) is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {[f'{where}.{m}' for m in missing]}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        path = f"{where}.{name}"
        if _is_dataclass_type(tp):
            # A partial section overrides the parent's default for it (SFTConfig's optimizer
            # defaults differ from OptimConfig's), not the section class's own defaults.
            f = fields[name]
            if f.default_factory is not dataclasses.MISSING and isinstance(value, dict):
                value = merge(to_dict(f.default_factory()), value)
            kwargs[name] = build(tp, value, where=path)
        else:
            kwargs[name] = _coerce(tp, value, path)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: may not be null")
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ValueError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        args = [a for a in typing.get_args(inner) if a is not Ellipsis]
        if origin is tuple and Ellipsis not in typing.get_args(inner) and len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {len(value)}")
        elem = args[0] if args else Any
        items = [_coerce(elem, v, f"{where}[{i}]") if elem is not Any else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if inner is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if inner is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-6" (no dot) as a string
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if inner in (int, str) and isinstance(value, inner) and not isinstance(value, bool):
        return value
    if inner is Any:
        return value
    raise ValueError(f"{where}: expected {getattr(inner, '__name__', inner)}, got {value!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain dicts, lists and scalars (tuples become lists), ready for YAML or JSON."""
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def dump(cfg: Any) -> str:
    """The config as YAML text, fields in declaration order; `build(type(cfg), yaml.safe_load(text))` is equal."""
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
