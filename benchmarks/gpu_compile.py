#!/usr/bin/env python
"""Eager vs the compile backend on one GPU with a Llama-2-7B-shaped model (random weights, built on the GPU by the
run_generation.py pipeline's --dummy-weights), against the card's decode roofline (the record's: datasheet bandwidth,
with a measured device copy beside it), in one process:

- eager, then the compile backend's decode step for each kernel choice (`library`: cuBLAS; `generated`: Triton
  reductions), greedy and each --beams;
- for the compile backend's greedy step, the default call (on cuda: the whole step replayed as one CUDA graph)
  against compiled calls through dynamo with its guards skipped and evaluated, alternating, so what each saves shows
  as a ratio measured side by side;
- tokens equal to eager's, per case.

    python benchmarks/gpu_compile.py                                  # fp16, greedy and beam 4, on a CUDA machine
    python benchmarks/gpu_compile.py --dtype bfloat16 --woq int4      # TorchAO INT4 (tinygemm) through both paths
    python benchmarks/gpu_compile.py --tiny                           # a 2-layer model on cpu: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmbench.cli import RunConfig
from llmbench.devices import device_name
from llmbench.pipeline import Pipeline, open_pipeline
from llmbench.roofline import device_bandwidth, roofline
from llmbench.timing import StepTimer

MODEL = "meta-llama/Llama-2-7b-hf"  # its built-in shape (llmbench/families.py), built with --dummy-weights
DETAILS = ("compile_time_s", "compile_mode", "step_calls", "fused_sibling_groups", "generated_linears",
           "fx_graph_cache_hits")
# How the compile backend's warmed-up greedy steps are called, timed alternately in one process: the default (on
# cuda, the whole step one CUDA graph), then as compiled calls through dynamo (guards skipped, then evaluated).
VARIANTS = ("default", "compiled calls", "compiled calls, guards on")


def tiny_config_file(folder: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512).save_pretrained(folder)
    return folder / "config.json"


def open_backend(name: str, args, folder: Path) -> Pipeline:
    """Random weights built directly on the device in the run's dtype (no copy on the host), quantized where
    --woq asks, prepared for `name`."""
    config = RunConfig(model_id=str(tiny_config_file(folder)) if args.tiny else MODEL, dummy_weights=True,
                       device="cpu" if args.tiny else "cuda", dtype="float32" if args.tiny else args.dtype,
                       backend=name, woq=args.woq, input_tokens=args.input_tokens,
                       max_new_tokens=args.max_new_tokens, quiet=True)
    return open_pipeline(config)


def time_generations(run: Pipeline, beams: int, iters: int) -> tuple[list[float], torch.Tensor]:
    """-> (next-token latencies of `iters` generations, the last one's ids)."""
    timer, new_tokens, ids, latencies = StepTimer(run.device), run.config.max_new_tokens, None, []
    for _ in range(iters):
        timer.start()
        ids = run.backend.generate(run.inputs(), new_tokens, beams, timer)
        latencies += timer.stop(new_tokens).token_latencies_s[1:]
    return latencies, ids


def warm_up(run: Pipeline, beams: int) -> float:
    """Compile (compile backend) and run once; -> seconds."""
    start = time.perf_counter()
    run.backend.warm_up_shapes(run.inputs(), run.config.max_new_tokens, beams)
    run.backend.generate(run.inputs(), run.config.max_new_tokens, beams)
    return time.perf_counter() - start


def report(case: str, latencies: list[float], bound: dict, setup_s: float, equal: str, args) -> None:
    """Print one case's line, and append it to --json at once (a later case that fails or overruns loses nothing)."""
    mean_s, median_s = statistics.mean(latencies), statistics.median(latencies)
    datasheet, measured = bound.get("datasheet_bandwidth_gb_s"), bound.get("measured_bandwidth_gb_s")
    row = {"case": case, "next_token_mean_ms": mean_s * 1e3, "next_token_median_ms": median_s * 1e3,
           "bytes_read_per_token": bound["bytes_read_per_token"], "achieved_gb_s": bound["bytes_read_per_token"]
           / mean_s / 1e9, "roofline_ms": bound["roofline_next_token_s"] * 1e3,
           "roofline_fraction": bound["roofline_next_token_s"] / mean_s, "roofline_source": bound["source"],
           "measured_copy_fraction": bound["bytes_read_per_token"] / (measured * 1e9) / mean_s if measured else None,
           "datasheet_gb_s": datasheet, "measured_copy_gb_s": measured, "setup_s": setup_s, "tokens_equal": equal}
    if args.json:
        with args.json.open("a", encoding="utf-8") as f:
            f.write(json.dumps({**row, "dtype": args.dtype, "woq": args.woq}) + "\n")
    copy = f", {row['measured_copy_fraction'] * 100:.0f}% of the measured copy" if measured else ""
    print(f"{case:42s} mean {row['next_token_mean_ms']:7.2f} ms, median {row['next_token_median_ms']:7.2f} ms, "
          f"{row['achieved_gb_s']:7.1f} GB/s, {row['roofline_fraction'] * 100:3.0f}% of roofline ({bound['source']})"
          f"{copy}; set-up {setup_s:.1f} s; tokens equal to eager: {equal}", flush=True)


def agreement(reference: torch.Tensor | None, ids: torch.Tensor, prompt_tokens: int) -> str:
    if reference is None:
        return "-"
    new_a, new_b = reference[0, prompt_tokens:], ids[0, prompt_tokens:]
    differs = (new_a != new_b).nonzero()
    return f"{int(differs[0, 0]) if differs.numel() else new_a.numel()}/{new_a.numel()} leading"


def widths(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated beam widths of 1 or more, e.g. 1,4")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer model on cpu (fp32): checks the script")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--woq", choices=("int4", "int8"), help="TorchAO weight-only quantization (int4: bfloat16)")
    parser.add_argument("--kernels", default="library", help="comma-separated compile kernel choices to time: "
                        "library (cuBLAS), generated (Triton reductions)")
    parser.add_argument("--beams", default=[1, 4], type=widths, help="comma-separated beam widths (1: greedy)")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager reference")
    parser.add_argument("--input-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-iter", type=int, default=3, help="generations per case and round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the greedy step's call variants")
    parser.add_argument("--json", type=Path, help="append one JSON line per case to this file")
    args = parser.parse_args()
    beams = args.beams
    reference: dict[int, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as folder:
        backends = ([] if args.no_eager else [("eager", None)]) + [("compile", k) for k in args.kernels.split(",")]
        bandwidth = None
        for name, kernels in backends:
            if kernels:
                os.environ["LLMBENCH_COMPILE_KERNELS"] = kernels
            run = open_backend(name, args, Path(folder))
            if bandwidth is None:
                bandwidth = device_bandwidth(run.device)
                print(f"device: {device_name(run.device)}; torch {torch.__version__}; dtype {run.dtype}; "
                      f"woq {args.woq}; bandwidth {json.dumps(bandwidth)}", flush=True)
            label = name if not kernels else f"compile/{kernels}"
            for width in beams:
                bound = roofline(run.loaded.model, run.dtype, width, args.input_tokens, args.max_new_tokens, bandwidth)
                setup_s = warm_up(run, width) + run.facts["prepare_time_s"]
                case = f"{label} {'greedy' if width == 1 else f'beam {width}'}"
                if name == "eager":
                    latencies, reference[width] = time_generations(run, width, args.num_iter * args.rounds)
                    report(case, latencies, bound, setup_s, "-", args)
                    continue
                backend, details = run.backend, run.backend.details
                graphs = backend.whole_step_graphs  # cuda: the whole step one CUDA graph
                rounds = {variant: [] for variant in (VARIANTS if width == 1 else VARIANTS[:1])}
                for _ in range(args.rounds if width == 1 else 1):
                    for variant in rounds:
                        backend.whole_step_graphs = graphs and variant == VARIANTS[0]
                        details["guards_after_warm_up"] = "evaluated" if variant == VARIANTS[2] else "skipped"
                        latencies, ids = time_generations(run, width, args.num_iter)
                        rounds[variant] += latencies
                        if variant == VARIANTS[0]:
                            equal = agreement(reference.get(width), ids, args.input_tokens)
                backend.whole_step_graphs, details["guards_after_warm_up"] = graphs, "skipped"
                for variant, latencies in rounds.items():
                    report(f"{case}, {variant}", latencies, bound, setup_s, equal, args)
                for variant in list(rounds)[1:]:
                    ratio = statistics.mean(rounds[VARIANTS[0]]) / statistics.mean(rounds[variant])
                    print(f"{'':42s} {VARIANTS[0]} / {variant}: {ratio:.3f}x the time", flush=True)
                facts = {key: details.get(key) for key in DETAILS}
                print(f"{'':42s} compile: {json.dumps(facts)}", flush=True)
            del run  # the next backend builds its own copy
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    from llmbench.allocator import restart_with_allocator

    restart_with_allocator()  # the allocator run_generation.py takes (llmbench/allocator.py)
    sys.exit(main())
