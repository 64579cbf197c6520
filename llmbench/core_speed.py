"""How fast this host's cores run now, against the best they have run here: a check after a cpu run's measurement.

Work on a hyperthread sibling (often another virtual machine's), a lowered clock (power capping, a burstable cloud
instance out of credits) or a laptop on battery slow a run's cores without showing in any CPU counter of this
machine (steal included). Two probes, ~0.06 s in all, with the run's own threads: one 256x256 float32 matrix product
per thread, repeated (the cores' vector units and clock: what compiled and quantized kernels need), and an add to 16
values repeated in one thread (an operator's dispatch through the framework: what an eager step's time is mostly
made of). Each is compared with the best this host has given for the same probe, thread count and torch build, kept
in LLMBENCH_CACHE/host.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from llmbench.roofline import cache_file, write_json_atomically

MATMUL_SIZE = 256  # 3 x 256 KiB a thread: inside the per-core caches of current CPUs, so memory plays no part
MATMUL_REPEATS = 5
OP_REPEATS = 500
BEST_OF = 20


def core_speed_method(threads: int) -> str:
    return (f"{threads} float32 {MATMUL_SIZE}x{MATMUL_SIZE} matrix products at once x{MATMUL_REPEATS} with {threads} "
            f"threads, add to 16 float32 values x{OP_REPEATS}; best of {BEST_OF}; torch {torch.__version__}")


def _best_seconds(work, repeats: int) -> float:
    work()
    best = float("inf")
    for _ in range(BEST_OF):
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        best = min(best, time.perf_counter() - start)
    return best


def measure_core_speed() -> dict:
    """-> {"matmul_gflop_s", "op_us", "threads", "method"}, measured in this process with its torch threads (one
    matrix product each: a host of many cores keeps every thread busy, not waiting on the others)."""
    threads = torch.get_num_threads()
    a, b = torch.randn(threads, MATMUL_SIZE, MATMUL_SIZE), torch.randn(threads, MATMUL_SIZE, MATMUL_SIZE)
    c = torch.empty_like(a)
    matmul_s = _best_seconds(lambda: torch.bmm(a, b, out=c), MATMUL_REPEATS)
    x, y = torch.ones(16), torch.empty(16)
    op_s = _best_seconds(lambda: torch.add(x, 1.0, out=y), OP_REPEATS)
    return {"matmul_gflop_s": 2 * MATMUL_SIZE**3 * threads * MATMUL_REPEATS / matmul_s / 1e9,
            "op_us": op_s / OP_REPEATS * 1e6, "threads": threads, "method": core_speed_method(threads)}


def best_file(threads: int) -> Path:
    path = cache_file(torch.device("cpu"), threads)
    return path.with_name(f"{path.stem}-cores.json")


def host_best(now: dict) -> dict | None:
    """The best figures this host has given for `now`'s method and threads: {"matmul_gflop_s", "op_us", ...}, or
    None."""
    method = now["method"]
    try:
        best = json.loads(best_file(now["threads"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(best, dict) or best.get("method") != method:
        return None
    if not (best.get("matmul_gflop_s", 0) > 0 and best.get("op_us", 0) > 0):
        return None
    return best


def remember(now: dict, best: dict | None) -> dict:
    """The best of `now` and `best` on each probe, written back for later runs (atomically)."""
    merged = dict(now) if best is None else {
        **best, "matmul_gflop_s": max(now["matmul_gflop_s"], best["matmul_gflop_s"]),
        "op_us": min(now["op_us"], best["op_us"])}
    if merged != best:
        merged["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json_atomically(best_file(now["threads"]), merged)
    return merged


def core_share(now: dict, best: dict) -> float:
    """How fast the cores ran now against their best: the slower of the two probes, 1.0 at the best."""
    return min(now["matmul_gflop_s"] / best["matmul_gflop_s"], best["op_us"] / now["op_us"])


if __name__ == "__main__":
    print(json.dumps(measure_core_speed()))
