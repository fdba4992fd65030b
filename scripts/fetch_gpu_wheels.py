"""Download the Linux x86-64 CPython 3.12 wheels that `scripts/gpu-check` installs on a GPU machine without network.

    scripts/fetch-gpu-wheels                  # into .gpu-wheels/ (ignored by git), on any machine with network
    scripts/fetch-gpu-wheels --dry-run        # resolve and list; fetches metadata (and sdists to build) only

The packages are those of scripts/gpu-requirements.txt with every dependency the GPU machine lacks.
pip resolves them for that machine (`--platform manylinux_2_17..2_34 --python-version 3.12`) with
stand-in wheels for what it already has (torch 2.11, triton 3.6): the stand-ins carry a local version
(`2.11.0+present`) that only they match, so the packages that ask for torch resolve against it and no
several-GB CUDA build of torch is downloaded. transformers 5.17, also there, takes part in the
resolution (so shared dependencies such as huggingface-hub stay within its ranges) and its wheel is
then dropped. Packages published only as an sdist (deepspeed) are built here into pure-Python wheels.
`--only pytest hypothesis` fetches what the kernel steps alone need.

The GPU machine takes at most 64 MiB of carried files, source tree and wheels together: the script
prints both and fails over the limit. `--twins` also fetches the CPython 3.11 wheels of the same
versions (and of the GPU machine's Triton and transformers, and the build tools) into
.gpu-wheels-py311/, which is never carried: `scripts/gpu-check --rehearse` installs from it, offline,
on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "scripts" / "gpu-requirements.txt"
# What the GPU machine has (name -> version): stand-ins, never downloaded.
PRESENT = {"torch": "2.11.0", "triton": "3.6.0"}
# Also there, with dependencies ours share: resolved alongside, not kept.
ALONGSIDE = ("transformers==5.17.0",)
SDIST_ONLY = ("deepspeed",)  # no wheel on PyPI; its sdist builds a py3-none-any wheel in seconds
PLATFORMS = ["manylinux2014_x86_64"] + [f"manylinux_2_{minor}_x86_64" for minor in range(17, 35)]
LOCAL_TAG = "present"
CARRY_LIMIT_MIB = 64  # what the GPU machine takes from the checkout: source tree, ignored paths and wheels
TWINS = ROOT / ".gpu-wheels-py311"
# Installed beside the twins in the rehearsal's 3.11 environment: what the GPU machine has (torch comes
# from this machine, --no-deps) and what the project's editable build needs.
REHEARSAL_PRESENT = ("triton==3.6.0", "transformers==5.17.0")
BUILD_TOOLS = ("scikit-build-core", "pybind11")


def requirement_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def requirements(path: Path = REQUIREMENTS, only: list[str] | None = None) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    reqs = [line for line in lines if line]
    if only:
        wanted = {name.lower().replace("_", "-") for name in only}
        unknown = wanted - {requirement_name(r) for r in reqs}
        if unknown:
            raise SystemExit(f"--only {sorted(unknown)}: not in {path.name}")
        reqs = [r for r in reqs if requirement_name(r) in wanted]
    return reqs


def stub_wheel(name: str, version: str, folder: Path) -> Path:
    """An empty wheel that tells pip `name` is installed at `version` (with the local tag), and nothing else."""
    full = f"{version}+{LOCAL_TAG}"
    dist = f"{name.replace('-', '_')}-{full}"
    path = folder / f"{dist}-py3-none-any.whl"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {full}\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: medvl-engine\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{dist}.dist-info/RECORD"])
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


def target_options(python: str = "3.12") -> list[str]:
    """pip options that resolve for CPython `python` on Linux x86-64, wheels only."""
    tag = "cp" + python.replace(".", "")
    options = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
               "--abi", tag, "--abi", "abi3", "--abi", "none"]
    for platform in PLATFORMS:
        options += ["--platform", platform]
    return options


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def build_sdist_only(reqs: list[str], dest: Path) -> None:
    for req in reqs:
        name = requirement_name(req)
        if name in SDIST_ONLY and not any(dest.glob(f"{name}-*-py3-none-any.whl")):
            pip("wheel", "--no-deps", "--wheel-dir", str(dest), req)
            if not any(dest.glob(f"{name}-*-py3-none-any.whl")):
                raise SystemExit(f"{name} did not build into a py3-none-any wheel: it would not install on Python 3.12")


def kept_out(name: str, version: str) -> bool:
    """Whether a resolved package stays out of the folder: a stand-in, or a package resolved alongside."""
    return version.endswith(f"+{LOCAL_TAG}") or name.lower() in {requirement_name(r) for r in ALONGSIDE}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".gpu-wheels")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve and print the list; fetch only metadata (and the sdists to build)")
    parser.add_argument("--present", nargs="*", default=[f"{k}=={v}" for k, v in PRESENT.items()],
                        help="packages the GPU machine has, NAME==VERSION (default: %(default)s)")
    parser.add_argument("--only", nargs="+", default=None, help="only these names of scripts/gpu-requirements.txt")
    parser.add_argument("--twins", action="store_true",
                        help=f"also fetch the CPython 3.11 twins into {TWINS.name}/ for scripts/gpu-check --rehearse")
    args = parser.parse_args(argv)
    present = dict(item.split("==", 1) for item in args.present)
    reqs = requirements(only=args.only)
    # The CPU environment's pin of torch (scripts/constraints.txt) must not reach this resolution.
    os.environ.pop("PIP_CONSTRAINT", None)
    with tempfile.TemporaryDirectory(prefix="medvl-gpu-wheels-") as tmp:
        tmp = Path(tmp)
        built = tmp / "built" if args.dry_run else args.dest
        built.mkdir(parents=True, exist_ok=True)
        build_sdist_only(reqs, built)
        stubs = tmp / "present"
        stubs.mkdir()
        stub_files = {stub_wheel(name, version, stubs).name for name, version in present.items()}
        constraints = tmp / "constraints.txt"
        constraints.write_text("".join(f"{name}=={version}+{LOCAL_TAG}\n" for name, version in present.items()))
        common = [*target_options(), "--find-links", str(built), "--find-links", str(stubs), "-c", str(constraints),
                  *reqs, *ALONGSIDE]
        if args.dry_run:
            report = tmp / "report.json"
            pip("install", "--dry-run", "--ignore-installed", "--target", str(tmp / "target"), "--report",
                str(report), *common)
            items = [i["metadata"] for i in json.loads(report.read_text())["install"]]
            names = sorted(f"{m['name']}=={m['version']}" for m in items if not kept_out(m["name"], m["version"]))
            print(f"{len(names)} packages would be downloaded:\n  " + "\n  ".join(names))
            return 0
        pip("download", "--dest", str(args.dest), *common)
    for name in stub_files:
        (args.dest / name).unlink(missing_ok=True)
    for req in ALONGSIDE:
        for wheel in args.dest.glob(f"{requirement_name(req).replace('-', '_')}-*.whl"):
            wheel.unlink()
    if args.twins:
        fetch_twins(args.dest, TWINS)
    return check_carried_size(args.dest)[0]


def wheel_pins(folder: Path) -> list[str]:
    """name==version of every wheel in `folder` (the file name's first two fields)."""
    return sorted({"{}=={}".format(*w.name.split("-")[:2]) for w in folder.glob("*.whl")})


def fetch_twins(carried: Path, twins: Path) -> None:
    """The CPython 3.11 wheels of the carried versions, the GPU machine's Triton and transformers, and the
    build tools (at this environment's versions), for the rehearsal: never carried. A version with no
    3.11 wheel (numpy 2.5 dropped 3.11) takes the newest that has one, and is named."""
    twins.mkdir(parents=True, exist_ok=True)
    pure = set()
    for wheel in carried.glob("*-none-any.whl"):  # pure Python, deepspeed's built one included
        (twins / wheel.name).write_bytes(wheel.read_bytes())
        pure.add(wheel.name.split("-")[0].lower())
    from importlib.metadata import version

    pins = [p for p in wheel_pins(carried) if p.split("==")[0].lower() not in pure]
    pins += list(REHEARSAL_PRESENT)
    differ = []
    # The build tools with their dependencies (pathspec, packaging), at this environment's versions.
    pip("download", "-q", "--dest", str(twins), *target_options("3.11"),
        *(f"{name}=={version(name)}" for name in BUILD_TOOLS))
    for pin in pins:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--dest", str(twins),
               *target_options("3.11"), pin]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            subprocess.run([*cmd[:-1], pin.split("==")[0]], check=True, capture_output=True)
            differ.append(pin)
    print(f"{len(list(twins.glob('*.whl')))} wheels for CPython 3.11 in {twins} (not carried)"
          + (f"; no 3.11 wheel of {', '.join(differ)}: the newest 3.11 one instead" if differ else ""))


def tree_bytes() -> int:
    """The source tree the GPU machine is sent: the files git tracks."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def check_carried_size(wheels_dir: Path, limit_mib: float = CARRY_LIMIT_MIB) -> tuple[int, float, float]:
    """(0 within the limit else 1, the wheels' MiB, wheels and source tree together in MiB), printed."""
    wheels = sorted(wheels_dir.glob("*.whl"))
    wheel_mib = sum(w.stat().st_size for w in wheels) / 2**20
    tree_mib = tree_bytes() / 2**20
    total = wheel_mib + tree_mib
    print(f"carried: {len(wheels)} wheels {wheel_mib:.1f} MiB + source tree {tree_mib:.1f} MiB = {total:.1f} MiB "
          f"(limit {limit_mib:.0f} MiB)")
    if total > limit_mib:
        print(f"over the limit by {total - limit_mib:.1f} MiB: the GPU machine would not take them. Largest: "
              + ", ".join(f"{w.name} {w.stat().st_size / 2**20:.1f} MiB"
                          for w in sorted(wheels, key=lambda w: -w.stat().st_size)[:5]), file=sys.stderr)
        return 1, wheel_mib, total
    return 0, wheel_mib, total


if __name__ == "__main__":
    sys.exit(main())
