#!/usr/bin/env bash
# The GPU figures of docs/measured.md (docs/backends.md, "GPU check") in one run on a CUDA machine, each step under
# its own time limit so that one failure or overrun leaves the others' figures: a Llama-2-7B-shaped model (random
# weights)
#   fp16:      eager against the compile backend, greedy: whole-step CUDA graphs against compiled calls
#   int4:      the compile backend with TorchAO INT4 (tinygemm, bfloat16), greedy
#   cli:       the run_generation.py record of the fp16 compile case (warm inductor cache: set-up time)
#   beam4:     the compile backend, fp16, beam 4
#   generated: the compile backend with Triton reductions for the linears (LLMBENCH_COMPILE_KERNELS=generated)
# A step given 0 seconds (FP16_S, INT4_S, CLI_S, BEAM_S, GENERATED_S) is left out.
# Logs, JSON lines (gpu.jsonl) and the record (results.jsonl) go to $OUT (default results/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_LOGS=${TORCH_LOGS:-perf_hints}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv |
    tee "$out/gpu.txt"
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" |
    tee -a "$out/gpu.txt"
step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2
    shift 2
    [ "$limit" = 0 ] && return
    echo "== $name: $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? after $SECONDS s in all"
    grep -v "^W[0-9]\|^V[0-9]\|^I[0-9]" "$out/$name.log" | grep -i "mean\|roofline\|error\|skipp\|compile:\|speed\|latency\|set-up\|valid\|device:" |
        tail -n 40
}
step "${FP16_S:-120}" fp16 $py benchmarks/gpu_compile.py --beams 1 --rounds 1 --json "$out/gpu.jsonl"
step "${INT4_S:-90}" int4 $py benchmarks/gpu_compile.py --no-eager --dtype bfloat16 --woq int4 --beams 1 --rounds 1 \
    --json "$out/gpu.jsonl"
step "${CLI_S:-50}" cli $py run_generation.py --benchmark --device cuda --dtype float16 --backend compile --greedy \
    --dummy-weights -m meta-llama/Llama-2-7b-hf --input-tokens 32 --max-new-tokens 64 --num-iter 5 --num-warmup 2 \
    --token-latency --quiet --results "$out/results.jsonl"
step "${BEAM_S:-60}" beam4 $py benchmarks/gpu_compile.py --no-eager --beams 4 --json "$out/gpu.jsonl"
step "${GENERATED_S:-120}" generated $py benchmarks/gpu_compile.py --no-eager --kernels generated --beams 1 \
    --json "$out/gpu.jsonl"
