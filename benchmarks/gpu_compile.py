#!/usr/bin/env python
"""Eager vs the compile backend on one GPU with a Llama-2-7B-shaped model (random fp16 weights, built on the GPU by
the run_generation.py pipeline's --dummy-weights):
greedy, batch 1, next-token latency against the weight-read roofline of the card.

    python benchmarks/gpu_compile.py            # on a CUDA machine
    python benchmarks/gpu_compile.py --tiny     # a 2-layer model on cpu: checks the script itself
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmbench.cli import RunConfig
from llmbench.devices import device_name
from llmbench.models import weight_bytes
from llmbench.pipeline import Pipeline, open_pipeline
from llmbench.roofline import datasheet_bandwidth, measure_copy_bandwidth
from llmbench.timing import StepTimer

MODEL = "meta-llama/Llama-2-7b-hf"  # its built-in shape (llmbench/families.py), built with --dummy-weights


def tiny_config_file(folder: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512).save_pretrained(folder)
    return folder / "config.json"


def open_backend(name: str, args, folder: Path) -> Pipeline:
    """Random weights built directly on the device in the run's dtype (no copy on the host), prepared for `name`."""
    config = RunConfig(model_id=str(tiny_config_file(folder)) if args.tiny else MODEL, dummy_weights=True,
                       device="cpu" if args.tiny else "cuda", dtype="float32" if args.tiny else "float16",
                       backend=name, num_beams=1, input_tokens=args.input_tokens,
                       max_new_tokens=args.max_new_tokens, quiet=True)
    return open_pipeline(config)


def time_backend(run: Pipeline, new_tokens: int, iters: int):
    backend, inputs, device = run.backend, run.inputs(), run.device
    start = time.perf_counter()
    backend.warm_up_shapes(inputs, new_tokens, 1)
    backend.generate(inputs, new_tokens, 1)  # warm-up
    setup_s = time.perf_counter() - start + run.facts["prepare_time_s"]
    timer = StepTimer(device)
    next_token, ids = [], None
    for _ in range(iters):
        timer.start()
        ids = backend.generate(inputs, new_tokens, 1, timer)
        next_token += timer.stop(new_tokens).token_latencies_s[1:]
    return statistics.mean(next_token), statistics.median(next_token), setup_s, ids, backend.details


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer model on cpu (fp32): checks the script")
    parser.add_argument("--input-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-iter", type=int, default=3)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in ("eager", "compile"):
            run = open_backend(name, args, Path(folder))
            if not results:
                device, wbytes = run.device, weight_bytes(run.loaded.model)
                gpu = device_name(device)
                datasheet = datasheet_bandwidth(gpu)
                measured = measure_copy_bandwidth(device, 2**30 if args.tiny else 8 * 2**30)
                print(f"device: {gpu}; torch {torch.__version__}; weights {wbytes / 1e9:.2f} GB ({run.dtype})")
                print(f"copy bandwidth measured: {measured / 1e12:.2f} TB/s; datasheet: "
                      f"{datasheet / 1e12 if datasheet else float('nan'):.2f} TB/s")
                for label, bw in (("datasheet", datasheet), ("measured copy", measured)):
                    if bw:
                        print(f"roofline ({label}): {wbytes / bw * 1e3:.2f} ms/token")
            mean_s, median_s, setup_s, ids, details = time_backend(run, args.max_new_tokens, args.num_iter)
            del run  # the next backend loads its own copy
            results[name] = (mean_s, ids)
            line = (f"{name:8s} next-token mean {mean_s * 1e3:.2f} ms, median {median_s * 1e3:.2f} ms, "
                    f"{wbytes / mean_s / 1e12:.2f} TB/s achieved")
            if datasheet:
                line += f", {wbytes / datasheet / mean_s * 100:.0f}% of datasheet roofline"
            line += f"; set-up incl. compile {setup_s:.1f} s"
            print(line, flush=True)
            if details.get("compile_time_s"):
                print(f"         compile details: {details['compile_time_s']} mode={details['compile_mode']}")
    speedup = results["eager"][0] / results["compile"][0]
    new_e = results["eager"][1][0, args.input_tokens:]
    new_c = results["compile"][1][0, args.input_tokens:]
    differs = (new_e != new_c).nonzero()
    agree = int(differs[0, 0]) if differs.numel() else new_e.numel()
    print(f"compile speed-up over eager: {speedup:.2f}x; leading greedy tokens equal to eager: "
          f"{agree}/{new_e.numel()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
