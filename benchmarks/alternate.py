#!/usr/bin/env python
"""The compiled decode step against llama.cpp on the same weights, alternating in one process, per placement of the
CPUs: the comparison a single table run (benchmarks/roofline.py) cannot settle on a shared host.

    python benchmarks/alternate.py                     # bf16 against llama.cpp F16, 12 rounds
    python benchmarks/alternate.py --woq int4 --rounds 20      # INT4 g32 against Q4_1

Compiles the default model's greedy decode step (--backend compile, as run_generation.py does), runs the llama.cpp
anchor once (../shared/anchors/llama_bench.sh: it builds llama.cpp and converts the GGUF where needed), then, under
the CPU lock, alternates one generation of ours (32 in / 64 new; the median step) with one `llama-bench -p 0 -n 64
-d 32 -r 1` on the anchor's GGUF, each tagged by where the CPUs sat before and after it (llmbench.placement: a
hypervisor that moves a guest's CPUs changes the memory bandwidth and every hand-over between threads; runs that
straddle a move are left out). Prints the medians and their ratio per placement, with the read bandwidth the
placement has given at best on this host (llmbench.roofline's cache).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, whatever the working folder
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from woq import ANCHOR, cpu_lock, run_anchor  # noqa: E402

from llmbench.host import cpu_kind  # noqa: E402
from llmbench.placement import PlacedRound, host_placements, placement_of  # noqa: E402


def llama_bench_ms(gguf: Path, threads: int) -> float:
    """One llama-bench run of 64 tokens after 32 of context: ms per token."""
    bench = Path(os.environ.get("ANCHORS_DIR", "/tmp/anchors")) / "llama.cpp-build" / "bin" / "llama-bench"
    done = subprocess.run([str(bench), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "jsonl", "-p", "0",
                           "-n", "64", "-d", "32"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"llama-bench failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return 1e3 / row["avg_ts"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--woq", choices=("int4",), help="INT4 g32 against llama.cpp Q4_1 (default: bf16 against F16)")
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

    import torch

    from llmbench.bandwidth_cache import cached_cpu_figure
    from llmbench.cli import RunConfig
    from llmbench.pipeline import open_pipeline, quiet_libraries
    from llmbench.timing import StepTimer

    anchor_type = "q4_1" if args.woq else "f16"
    found = run_anchor(False, ANCHOR, anchor_type)
    if found is None or found[1] is None:
        raise SystemExit(f"the llama.cpp anchor ({anchor_type}) did not run (see above)")
    gguf = found[1]
    quiet_libraries(verbose=False, no_progress=True)
    config = RunConfig(device="cpu", dtype="bfloat16", woq=args.woq, backend="compile", quiet=True,
                       input_tokens=32, max_new_tokens=64)
    run = open_pipeline(config)
    backend, inputs = run.backend, run.inputs()
    backend.warm_up_shapes(inputs, 64, 1)
    places: list[float | None] = []
    times: dict[str, list[tuple[float | None, float]]] = {"ours": [], "llama.cpp": []}
    with cpu_lock(True):
        for r in range(args.rounds):
            for who in (("ours", "llama.cpp") if r % 2 == 0 else ("llama.cpp", "ours")):
                with PlacedRound(places) as where:
                    if who == "ours":
                        timer = StepTimer(torch.device("cpu"))
                        timer.start()
                        backend.generate(inputs, 64, 1, timer)
                        ms = statistics.median(timer.stop(64).token_latencies_s[1:]) * 1e3
                    else:
                        ms = llama_bench_ms(gguf, torch.get_num_threads())
                if not where.moved:
                    times[who].append((where.key, ms))
    ours = f"compile {'INT4 g32' if args.woq else 'bf16'}"
    print(f"{ours} against llama.cpp {anchor_type.upper()}, default model, greedy, 32 in / 64 new, {args.rounds} "
          f"alternating rounds (medians of ms/token); {cpu_kind().describe()}; {torch.get_num_threads()} threads")
    best = host_placements(cached_cpu_figure()[1])
    for place in places:
        a = [ms for w, ms in times["ours"] if w == place]
        b = [ms for w, ms in times["llama.cpp"] if w == place]
        gb_s = (placement_of(best, place) or {}).get("bandwidth_gb_s")
        where = f"the CPUs ~{place:.0f} ns apart" if place else "placement unknown"
        where += f", best read there {gb_s:.1f} GB/s" if gb_s else ""
        ratio = f"{statistics.median(a) / statistics.median(b):.2f}x the time" if a and b else "no ratio"
        print(f"  {where}: {ours} {f'{statistics.median(a):.2f}' if a else '-'} ms ({len(a)} runs), llama.cpp "
              f"{f'{statistics.median(b):.2f}' if b else '-'} ms ({len(b)}): {ratio}")
    return 0


if __name__ == "__main__":
    from llmbench.allocator import restart_with_allocator

    restart_with_allocator()  # the allocator run_generation.py takes (llmbench/allocator.py)
    sys.exit(main())
