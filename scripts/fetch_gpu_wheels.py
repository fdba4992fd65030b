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


def target_options() -> list[str]:
    """pip options that resolve for CPython 3.12 on Linux x86-64, wheels only."""
    options = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
               "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
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
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.0f} MiB in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
