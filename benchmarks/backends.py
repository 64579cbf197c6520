#!/usr/bin/env python
"""Every backend on the default model in one run: next-token latency, speed-up over eager, achieved weight bandwidth
against this machine's measured read bandwidth, and greedy-token agreement with eager.

    python benchmarks/backends.py                       # float32 and bfloat16, cpu
    python benchmarks/backends.py --dtypes bfloat16 --profile --lock /tmp/llmbench-cpu.lock

Every backend registered in llmbench/backends/__init__.py runs that can run here: ipex joins when Intel Extension for
PyTorch is importable with a matching torch/transformers (requirements-ipex.txt).
In float32 every backend must give eager's greedy tokens (exit status 1 otherwise); in bfloat16 the number of
leading tokens that agree is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, whatever the working folder

from woq import leading_agreement  # noqa: E402

from llmbench.backends import backend_names, get_backend
from llmbench.cli import RunConfig
from llmbench.errors import UserError
from llmbench.models import weight_bytes
from llmbench.pipeline import open_pipeline
from llmbench.roofline import measure_cpu_read_bandwidth
from llmbench.timing import StepTimer


@contextlib.contextmanager
def held(lock_path: str | None, wait_s: float):
    """Hold an flock on `lock_path` (if given) while timing, so cooperating jobs on a shared machine stay out; after
    `wait_s` seconds without it, time anyway and say so."""
    if lock_path is None:
        yield
        return
    with open(lock_path, "a") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    print(f"note: {lock_path} still held by another job after {wait_s:.0f} s: timing without it",
                          flush=True)
                    yield
                    return
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def available_backends() -> list[str]:
    """Every registered backend (llmbench.backends.BACKENDS) that can run here; the others are named and skipped."""
    names = []
    for name in backend_names():
        try:
            get_backend(name)  # a backend whose packages are missing or mismatched refuses here
            names.append(name)
        except UserError as exc:
            print(f"{name} skipped: {exc}", flush=True)
    return names


def prepared(name: str, dtype_name: str, args) -> dict:
    """Load, prepare, compile and warm up one backend through the run_generation.py pipeline (untimed, no lock)."""
    config = RunConfig(device=args.device, dtype=dtype_name, backend=name, num_beams=1, batch_size=args.batch_size,
                       input_tokens=args.input_tokens, max_new_tokens=args.max_new_tokens, quiet=True)
    start = time.perf_counter()
    run = open_pipeline(config)
    inputs, backend = run.inputs(), run.backend
    backend.warm_up_shapes(inputs, args.max_new_tokens, 1)
    backend.generate(inputs, args.max_new_tokens, 1)  # warm-up
    print(f"{name} {dtype_name} ready", flush=True)
    return {"name": name, "setup_s": time.perf_counter() - start - run.facts["load_time_s"],
            "weight_bytes": weight_bytes(run.loaded.model), "details": backend.details, "backend": backend,
            "inputs": inputs, "device": run.device}


def measure(result: dict, args) -> None:
    timer, next_token, ids = StepTimer(result["device"]), [], None
    for _ in range(args.num_iter):
        timer.start()
        ids = result["backend"].generate(result["inputs"], args.max_new_tokens, 1, timer)
        next_token += timer.stop(args.max_new_tokens).token_latencies_s[1:]
    result["next_token_s"] = statistics.mean(next_token)
    result["ids"] = ids[0, result["inputs"].num_tokens:].tolist()


def profile(result: dict, args, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    backend, inputs = result["backend"], result["inputs"]
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        backend.generate(inputs, args.max_new_tokens, 1)
    print(f"\nProfile of one {result['name']} generation ({args.max_new_tokens} tokens), by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default=None, help="comma-separated; default: eager, compile, ipex if present")
    parser.add_argument("--input-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-iter", type=int, default=3)
    parser.add_argument("--lock", default=None, help="flock this file while timing (a shared machine)")
    parser.add_argument("--lock-wait", type=float, default=1800, help="seconds to wait for --lock, then time anyway")
    parser.add_argument("--profile", action="store_true", help="torch.profiler summary of the fastest backend")
    args = parser.parse_args()
    names = args.backends.split(",") if args.backends else available_backends()
    failed, bandwidth = False, None
    for dtype_name in args.dtypes.split(","):
        results = [prepared(name, dtype_name, args) for name in names]
        with held(args.lock, args.lock_wait):
            if bandwidth is None:
                bandwidth = measure_cpu_read_bandwidth()
                print(f"device {args.device}, {torch.get_num_threads()} threads; measured read bandwidth "
                      f"{bandwidth / 1e9:.1f} GB/s", flush=True)
            for result in results:
                measure(result, args)
        eager = next((r for r in results if r["name"] == "eager"), results[0])
        roofline_s = eager["weight_bytes"] / bandwidth
        print(f"\n{dtype_name}: weights {eager['weight_bytes'] / 1e6:.0f} MB, "
              f"roofline {roofline_s * 1e3:.2f} ms/token; "
              f"batch {args.batch_size}, {args.input_tokens} input tokens, {args.max_new_tokens} new, greedy")
        print(f"{'backend':8s} {'ms/token':>9s} {'speed-up':>9s} {'GB/s':>7s} {'% roofline':>10s} "
              f"{'tokens = eager':>15s} {'set-up s':>9s}")
        for r in results:
            agree = leading_agreement(r["ids"], eager["ids"])
            if dtype_name == "float32" and agree != len(eager["ids"]):
                failed = True
            print(f"{r['name']:8s} {r['next_token_s'] * 1e3:9.2f} {eager['next_token_s'] / r['next_token_s']:8.2f}x "
                  f"{r['weight_bytes'] / r['next_token_s'] / 1e9:7.1f} {roofline_s / r['next_token_s'] * 100:9.0f}% "
                  f"{agree:>8d} of {len(eager['ids']):<3d} {r['setup_s']:9.1f}", flush=True)
        if args.profile:
            profile(min(results, key=lambda r: r["next_token_s"]), args)
    if failed:
        print("FAILED: a backend's float32 greedy tokens differ from eager's", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from llmbench.allocator import restart_with_allocator

    restart_with_allocator()  # the allocator run_generation.py takes (llmbench/allocator.py)
    sys.exit(main())
