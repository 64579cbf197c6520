"""bf16 vs INT8 vs INT4 weight-only next-token latency in one run, eager and compiled, optionally against llama.cpp.

    python benchmarks/woq.py [--backends eager,compile] [--anchor]

Each (scheme, backend) pair runs the same pipeline as run_generation.py --benchmark (load, quantize, prepare,
warm up / compile), then times greedy decoding while holding the shared CPU lock (/tmp/llmbench-cpu.lock), so
compiling never blocks others and timings are not disturbed by runs that respect the lock. Bytes read per token
are what one decode step reads (llmbench.roofline.decode_bytes_read): the weights, except an input embedding table
that is not also the output head (one row of it is read per token), plus the KV cache at the mean decode position.
benchmarks/roofline.py builds its table from the helpers here.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmbench.benchmark import Measurement, measure, metrics_for  # noqa: E402
from llmbench.cli import WOQ_SCHEMES, RunConfig  # noqa: E402
from llmbench.core_speed import core_share, host_best, measure_core_speed  # noqa: E402
from llmbench.models import weight_bytes  # noqa: E402
from llmbench.pipeline import open_pipeline, quiet_libraries  # noqa: E402
from llmbench.placement import round_trip_ns  # noqa: E402
from llmbench.roofline import check_cpu_read_bandwidth, decode_bytes_read, override_bandwidth  # noqa: E402

LOCK = Path("/tmp/llmbench-cpu.lock")
ANCHOR = ROOT.parent / "shared" / "anchors" / "llama_bench.sh"


@contextlib.contextmanager
def cpu_lock(enabled: bool):
    if not enabled:
        yield
        return
    with open(LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def leading_agreement(tokens: list[int], reference: list[int]) -> int:
    """How many leading tokens two generations share."""
    for i, (a, b) in enumerate(zip(tokens, reference)):
        if a != b:
            return i
    return min(len(tokens), len(reference))


SCHEME_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # unquantized; int8/int4 compute in --dtype
KNOWN_SCHEMES = (*SCHEME_DTYPES, *WOQ_SCHEMES)  # what run_one takes


def run_one(scheme: str, backend: str, args: argparse.Namespace) -> dict:
    """Time one (scheme, backend) case through the run_generation.py pipeline -> a row for the tables."""
    quantized = scheme not in SCHEME_DTYPES
    config = RunConfig(model_id=args.model, device=args.device, dtype=SCHEME_DTYPES.get(scheme, args.dtype),
                       backend=backend, num_beams=getattr(args, "num_beams", 1), input_tokens=args.input_tokens,
                       max_new_tokens=args.max_new_tokens, num_iter=args.num_iter, num_warmup=args.num_warmup,
                       token_latency=True, quiet=True, woq=scheme if quantized else None,
                       woq_group_size=args.group_size if scheme == "int4" else None,
                       dummy_weights=args.dummy_weights)
    run = open_pipeline(config)
    inputs = run.inputs()
    run.backend.warm_up_shapes(inputs, config.max_new_tokens, config.num_beams)  # compiles outside the lock
    measurement = Measurement()
    with cpu_lock(not args.no_lock and run.device.type == "cpu"):
        # where the CPUs sat before and after (llmbench.placement: a hypervisor that moves them changes the figures)
        placement = [round_trip_ns() if run.device.type == "cpu" else None]
        measure(run.backend, inputs, config, run.device, None, measurement)
        placement.append(round_trip_ns() if run.device.type == "cpu" else None)
        # the memory's bandwidth right after, as a record's validity checks it (a shared host lowers it), unless
        # the user set the bandwidth
        checked = run.device.type == "cpu" and override_bandwidth() is None
        check = check_cpu_read_bandwidth() if checked else {}
        cores = measure_core_speed() if run.device.type == "cpu" else None  # and the cores' (a busy sibling)
    best = host_best(cores) if cores else None
    metrics = metrics_for(measurement, config.batch_size, weight_bytes(run.loaded.model))
    read = decode_bytes_read(run.loaded.model, run.dtype, config.num_beams, inputs.num_tokens,
                             config.max_new_tokens)["bytes_read_per_token"]
    next_s = metrics["next_token_latency_s"]
    row = {"scheme": scheme, "backend": backend, "model": run.loaded.name,
           "dtype": str(run.dtype).removeprefix("torch."), "next_ms": next_s * 1e3,
           "first_ms": metrics["first_token_latency_s"] * 1e3, "bytes_read": read, "gb_s": read / next_s / 1e9,
           "tokens": measurement.output_token_ids,
           "compile_s": sum(run.backend.details.get("compile_time_s", {}).values()) or None,
           "run_gb_s": check.get("read_bandwidth_gb_s"), "run_placement_ns": check.get("placement_ns"),
           "cores_share": core_share(cores, best) if best else None, "quantization": run.facts.get("quantization"),
           "placement_ns": placement, "details": dict(run.backend.details)}
    del run
    gc.collect()
    return row


def run_anchor(allow_busy: bool, script: Path = ANCHOR, anchor_type: str = "q4_1") -> tuple[float, Path | None] | None:
    """llama.cpp's ms/token on the same model and machine (tg after 32 tokens of context) and the GGUF file it ran,
    or None. anchor_type: the weights it runs (q4_1: the default model's GGUF as shipped; f16, bf16: converted)."""
    env = {"ANCHOR_TYPE": anchor_type, **({"ANCHORS_ALLOW_BUSY": "1"} if allow_busy else {})}
    done = subprocess.run(["bash", str(script)], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
    found = re.search(r"llama\.cpp tg@d32 ms/token: ([0-9.]+)", done.stdout)
    if done.returncode != 0 or not found:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"llama.cpp anchor ({anchor_type}) did not run: {last}", file=sys.stderr)
        return None
    model = re.search(r"^llama\.cpp anchor: .*?\((/[^)]*\.gguf)\)", done.stdout, re.MULTILINE)
    return float(found.group(1)), Path(model.group(1)) if model else None


def scheme_list(text: str) -> list[str]:
    """--schemes' value: comma-separated names, each one of KNOWN_SCHEMES."""
    schemes = text.split(",")
    unknown = sorted(set(schemes) - set(KNOWN_SCHEMES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(KNOWN_SCHEMES)}")
    return schemes


def add_case_args(p: argparse.ArgumentParser, schemes: str, backends: str) -> None:
    """The flags that say which cases run and how (shared with benchmarks/roofline.py)."""
    p.add_argument("-m", "--model", default=None, help="default: the built-in SmolLM2-135M-Instruct")
    p.add_argument("--dummy-weights", action="store_true",
                   help="-m's real size with random weights (a built-in id or a config.json): timing only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype of the int8/int4 schemes")
    p.add_argument("--schemes", default=schemes, type=scheme_list,  # argparse applies the type to the default too
                   help=f"comma-separated, of {', '.join(KNOWN_SCHEMES)}")
    p.add_argument("--backends", default=backends)
    p.add_argument("--group-size", type=int, default=None, help="int4 group size (default: quantize.py's)")
    p.add_argument("--input-tokens", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-iter", type=int, default=5)
    p.add_argument("--num-warmup", type=int, default=1)
    p.add_argument("--anchor-script", type=Path, default=ANCHOR,
                   help="llama.cpp anchor script (one that prints 'llama.cpp tg@d32 ms/token: X'), e.g. a build "
                        "for a CPU the shared one's instruction set does not fit")
    p.add_argument("--anchor-allow-busy", action="store_true", help="time llama.cpp even when the CPUs are busy")
    p.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK} while timing")


def default_config():
    """The default model's transformers config (its shapes)."""
    from transformers import AutoConfig

    from llmbench.models import resolve_source

    return AutoConfig.from_pretrained(resolve_source(None, quiet=True)[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(p, schemes="bf16,int8,int4", backends="eager,compile")
    p.add_argument("--anchor", action="store_true", help="also time llama.cpp (../shared/anchors/llama_bench.sh)")
    args = p.parse_args()
    quiet_libraries(verbose=False, no_progress=True)
    rows = []
    for backend in args.backends.split(","):
        for scheme in args.schemes:
            print(f"[{scheme} {backend}] preparing ...", file=sys.stderr, flush=True)
            rows.append(run_one(scheme, backend, args))
    base = {r["backend"]: r["next_ms"] for r in rows if r["scheme"] == "bf16"}
    print(f"\n{'scheme':<7}{'backend':<9}{'next ms/token':>14}{'vs bf16':>9}{'MB read/token':>15}{'GB/s':>7}"
          f"{'compile s':>11}  quantization")
    for r in rows:
        ratio = f"{base[r['backend']] / r['next_ms']:.2f}x" if r["backend"] in base else "-"
        q = r["quantization"]
        detail = f"{q['layout']} g{q['group_size']} {q['quantized_layers']} layers" if q else r["dtype"]
        compile_s = f"{r['compile_s']:.0f}" if r["compile_s"] else "-"
        print(f"{r['scheme']:<7}{r['backend']:<9}{r['next_ms']:>14.2f}{ratio:>9}{r['bytes_read'] / 1e6:>15.1f}"
              f"{r['gb_s']:>7.1f}{compile_s:>11}  {detail}")
    for r in rows:
        if r["scheme"] != "bf16" and r["backend"] in base:
            ref = next(x for x in rows if x["scheme"] == "bf16" and x["backend"] == r["backend"])
            same = sum(a == b for a, b in zip(r["tokens"], ref["tokens"]))
            print(f"{r['scheme']} {r['backend']}: {same}/{len(ref['tokens'])} greedy tokens equal to bf16's")
    if args.anchor:
        anchor = run_anchor(args.anchor_allow_busy, args.anchor_script)
        ours = [r for r in rows if r["scheme"] == "int4"]
        if anchor and ours:
            llama_ms = anchor[0]
            best = min(ours, key=lambda r: r["next_ms"])
            print(f"llama.cpp Q4_1: {llama_ms:.2f} ms/token; our INT4 ({best['backend']}): {best['next_ms']:.2f} "
                  f"ms/token; ours / llama.cpp = {best['next_ms'] / llama_ms:.2f}")
    return 0


if __name__ == "__main__":
    from llmbench.allocator import restart_with_allocator

    restart_with_allocator()  # the allocator run_generation.py takes (llmbench/allocator.py)
    sys.exit(main())
