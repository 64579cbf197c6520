#!/usr/bin/env python
"""Where a compiled cpu decode step's time goes: its linears' weight reads against everything else, in one process.

    python benchmarks/step_split.py                       # bf16, greedy, default model, 32 in / 64 new
    python benchmarks/step_split.py --woq int4 --input-tokens 1024
    python benchmarks/step_split.py --batch-size 8             # or --num-beams 4: several rows of x a step

Compiles the default model's decode step (--backend compile; greedy unless --num-beams) and alternates runs with the
weight-streaming kernels' work on and off (llmbench_cpu.set_linear_work: off, every linear returns zeros without
reading its weights; x is still read, quantized where the kernel quantizes it, and the output allocated), with a 1 GiB
sum after each pair, under the CPU lock. Prints the median next-token time of both, their difference (the time the
linears spend reading weights) as GB/s of the weight bytes a step reads, beside the sum's rate, and what the step
would take if the linears read at the sum's rate. The step without the weights' reads is a lower bound on the rest's
cost in a real step, where streaming the weights evicts from the caches what the rest uses. Only the kernels' linears
are switched: a record's `one_row_dense_linears` that says "generated reductions" leaves those in the figures.
Each generation and each sum is tagged by where the CPUs sat (llmbench.placement: a hypervisor that moves a guest's
CPUs changes the memory bandwidth and the cost of the threads' hand-overs); where the rounds ran in several
placements, the figures follow for each placement apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, whatever the working folder
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from woq import cpu_lock  # noqa: E402

from llmbench.host import cpu_kind  # noqa: E402
from llmbench.placement import MOVED_RATIO, moved, round_trip_ns  # noqa: E402


def main() -> int:
    from llmbench.errors import UserError, one_line

    try:
        return split()
    except UserError as exc:  # bad input or an unmet requirement: one line, as run_generation.py says it
        raise SystemExit(f"error: {one_line(exc)}") from None


def split() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--woq", choices=("int4", "int8"))
    p.add_argument("--input-tokens", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    if min(args.rounds, args.input_tokens, args.batch_size, args.num_beams) < 1 or args.max_new_tokens < 2:
        p.error("--rounds, --input-tokens, --batch-size and --num-beams must be at least 1, --max-new-tokens at "
                "least 2")

    import torch

    from llmbench.cli import RunConfig
    from llmbench.pipeline import open_pipeline, quiet_libraries
    from llmbench.roofline import check_cpu_read_bandwidth, decode_bytes_read
    from llmbench.timing import StepTimer

    quiet_libraries(verbose=False, no_progress=True)
    config = RunConfig(device="cpu", dtype=args.dtype, woq=args.woq, backend="compile", num_beams=args.num_beams,
                       batch_size=args.batch_size, quiet=True, input_tokens=args.input_tokens,
                       max_new_tokens=args.max_new_tokens)
    run = open_pipeline(config)
    backend, inputs, new, beams = run.backend, run.inputs(), args.max_new_tokens, args.num_beams
    if "streaming_linears" not in backend.details:
        raise SystemExit(f"the kernels did not load: {backend.details.get('streaming_linears_unavailable')}")
    if not args.woq and "generated reductions" in (backend.details.get("one_row_dense_linears") or ""):
        raise SystemExit(f"{args.dtype}'s one-row linears run as generated reductions on this CPU, which the switch "
                         "does not reach: LLMBENCH_ONE_ROW_DENSE=kernels runs them through the kernels")
    read = decode_bytes_read(run.loaded.model, run.dtype, args.batch_size * beams, inputs.num_tokens, new)
    switch = torch.ops.llmbench_cpu.set_linear_work
    backend.warm_up_shapes(inputs, new, beams)
    steps: list[tuple[bool, float, float | None]] = []  # (work, median step, where the CPUs sat), each generation
    sums: list[tuple[float, float | None]] = []  # (GB/s, where the CPUs sat)
    with cpu_lock(True):
        try:
            for r in range(args.rounds + 1):
                for work in ((True, False) if r % 2 == 0 else (False, True)):
                    switch(work)
                    timer = StepTimer(torch.device("cpu"))
                    before = round_trip_ns()
                    timer.start()
                    backend.generate(inputs, new, beams, timer)
                    step = statistics.median(timer.stop(new).token_latencies_s[1:])
                    if r:  # the first round warms both up
                        steps.append((work, step, before if not moved(before, round_trip_ns()) else None))
                if r:
                    before = round_trip_ns()
                    gb_s = check_cpu_read_bandwidth(repeats=3)["read_bandwidth_gb_s"]
                    sums.append((gb_s, before if not moved(before, round_trip_ns()) else None))
        finally:
            switch(True)
    search = "greedy" if beams == 1 else f"beam-{beams}"
    print(f"compiled {search} decode step, default model, {args.dtype}{' ' + args.woq if args.woq else ''}, "
          f"batch {args.batch_size}, "
          f"{inputs.num_tokens} in / {new} new, {args.rounds} alternating rounds (medians); {cpu_kind().describe()}; "
          f"{torch.get_num_threads()} threads")
    print(f"  one-row linears: {backend.details.get('one_row_dense_linears') or 'kernels'}")
    report(steps, sums, read, "all rounds")
    # A hypervisor that moves the CPUs changes the memory bandwidth and the threads' hand-overs (llmbench.placement):
    # where the rounds ran in several placements, each apart (generations whose CPUs moved during them left out)
    groups = placement_groups([s[-1] for s in steps + sums if s[-1]])
    for low, high in groups if len(groups) > 1 else []:
        def inside(ns):
            return ns is not None and low <= ns <= high

        report([s for s in steps if inside(s[2])], [s for s in sums if inside(s[1])], read,
               f"the CPUs {low:.0f}-{high:.0f} ns apart (a cache line's round trip)")
    return 0


def placement_groups(round_trips: list[float]) -> list[tuple[float, float]]:
    """The ranges of round trips that come from one placement: sorted, split where one is MOVED_RATIO times the
    previous."""
    groups: list[list[float]] = []
    for ns in sorted(round_trips):
        if groups and ns <= groups[-1][0] * MOVED_RATIO:
            groups[-1].append(ns)
        else:
            groups.append([ns])
    return [(g[0], g[-1]) for g in groups]


def report(steps: list[tuple[bool, float, float | None]], sums: list[tuple[float, float | None]], read: dict,
           title: str) -> None:
    full = [s for work, s, _ in steps if work]
    rest = [s for work, s, _ in steps if not work]
    if not (full and rest and sums):
        print(f"  {title}: too few rounds ({len(full)} with the reads, {len(rest)} without, {len(sums)} sums)")
        return
    full, rest = statistics.median(full), statistics.median(rest)
    gb_s = [g for g, _ in sums]
    weights, sum_gb_s = read["weight_bytes_read_per_token"], statistics.median(gb_s)
    print(f"  {title}:")
    print(f"    whole step                       {full * 1e3:7.2f} ms")
    print(f"    without the weights' reads       {rest * 1e3:7.2f} ms ({rest / full:.0%} of the step)")
    print(f"    the weights' reads               {(full - rest) * 1e3:7.2f} ms: {weights / 1e6:.1f} MB at "
          f"{weights / max(full - rest, 1e-9) / 1e9:.1f} GB/s; a 1 GiB sum read {sum_gb_s:.1f} GB/s "
          f"(range {min(gb_s):.1f}-{max(gb_s):.1f})")
    print(f"    at the sum's rate the step would take {(weights / (sum_gb_s * 1e9) + rest) * 1e3:.2f} ms; the KV "
          f"cache ({read['kv_cache_bytes_read_per_token'] / 1e6:.1f} MB a step) counts as the rest")


if __name__ == "__main__":
    from llmbench.allocator import restart_with_allocator

    restart_with_allocator()  # the allocator run_generation.py takes (llmbench/allocator.py)
    sys.exit(main())
