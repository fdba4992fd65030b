"""The layer order, enforced on every import of the package (lazy ones inside functions included):

    core (data, prompts, rewards, files, config, vision, logging, kernels)
      < rollout, transport
      < trainers, evals, databuild, scoring
      < api, cli, demo, bench

A module imports only its own layer and those below it. The check reads the source with `ast`, so it
needs no import of the package and sees imports that only run on some path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CORE, ROLLOUT, COMMANDS, TOP = 0, 1, 2, 3
LAYER_NAMES = {CORE: "core", ROLLOUT: "rollout/transport", COMMANDS: "trainers/evals/databuild", TOP: "api/cli/demo"}
# medvl_engine.<first name> -> layer. A new module or package gets its line here.
LAYERS = {
    "_build": CORE, "_native": CORE, "benchmarking": CORE, "config": CORE, "data": CORE, "errors": CORE,
    "files": CORE, "grading": CORE, "kernels": CORE, "logs": CORE, "models": CORE, "profiling": CORE,
    "progress": CORE, "prompts": CORE, "rewards": CORE, "run_folder": CORE, "tables": CORE,
    "vision": CORE,
    "rollout": ROLLOUT, "transport": ROLLOUT,
    "trainers": COMMANDS, "evals": COMMANDS, "databuild": COMMANDS, "scoring": COMMANDS,
    "api": TOP, "bench": TOP, "cli": TOP, "demo": TOP, "score_demo": TOP,
}
# Where each installed package's modules live in the checkout.
SOURCES = {"medvl_engine": ROOT / "medvl_engine", "medvl_engine.kernels": ROOT / "kernels",
           "medvl_engine.trainers": ROOT / "trainers", "medvl_engine.evals": ROOT / "evals"}


def module_files() -> dict[str, Path]:
    files = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_init = parts[-1] == "__init__"
            if is_init:
                parts = parts[:-1]
            files[".".join([package, *parts])] = (path, is_init)
    return files


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from medvl_engine import evals` names the subpackage in the alias.
            if target == "medvl_engine":
                found += [(node.lineno, f"medvl_engine.{alias.name}") for alias in node.names
                          if alias.name in LAYERS]
    return found


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "medvl_engine" or len(parts) == 1:
        return None
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: no layer assigned; add medvl_engine.{parts[1]} to LAYERS in {__file__}")
    return LAYERS[parts[1]]


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    own = layer_of(module)
    bad = []
    for line, target in imported_modules(source, module, is_package):
        layer = layer_of(target)
        if layer is not None and own is not None and layer > own:
            bad.append(f"{module}:{line} imports {target} ({LAYER_NAMES[own]} -> {LAYER_NAMES[layer]})")
    return bad


def test_no_module_imports_a_higher_layer():
    bad = []
    for module, (path, is_init) in sorted(module_files().items()):
        bad += violations(path.read_text(), module, is_init)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)


@pytest.mark.parametrize("source,module", [
    ("from medvl_engine.trainers.metrics import truncate_to_step", "medvl_engine.profiling"),
    ("def f():\n    from medvl_engine.api import evaluate", "medvl_engine.trainers.grpo"),
    ("from ..evals.report import x", "medvl_engine.rollout.pool"),
    ("from medvl_engine import cli", "medvl_engine.transport.receiver"),
    ("import medvl_engine.demo", "medvl_engine.kernels.policy_loss"),
])
def test_a_planted_upward_import_is_caught(source, module):
    assert len(violations(source, module)) == 1


def test_imports_down_and_sideways_are_allowed():
    assert violations("from medvl_engine.rollout.pool import RolloutPool\nfrom medvl_engine.kernels import x\n"
                      "from medvl_engine.evals.report import y", "medvl_engine.trainers.grpo") == []
