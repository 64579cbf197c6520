#!/usr/bin/env python
"""Where one decode step's linear calls spend their time, per placement of the CPUs: each call's set-up, the fork of
its OpenMP region, the first two threads' shares, how unevenly they end, and the join.

    python benchmarks/call_timeline.py                      # bf16, 1 row of x, 60 s
    python benchmarks/call_timeline.py --kinds bf16,int4 --rows 1,4 --seconds 120
    python benchmarks/call_timeline.py --step [--woq int4]  # inside compiled greedy generations
    python benchmarks/call_timeline.py --step --num-beams 4  # beam search's steps (4 rows of x)

Builds this checkout's CPU kernels (llmbench/backends/cpu_gemv.cpp) once more with -DLLMBENCH_CALL_TRACE=1, whose
run() notes the clock at each stage of every call of up to LLMBENCH_EVEN_SPLIT_ROWS rows (an even share per thread),
and times one step's linears of the default model's shapes (random weights in huge pages, as
benchmarks/kernel_builds.py places them) round after round under the CPU lock for --seconds. Each round is tagged by
where the CPUs sat before and after it (llmbench.placement; rounds during which they moved are left out). Per
placement it prints, per shape (medians of the calls, us) and per step (medians of the rounds' sums, ms): set-up
(entry to the region: the output's allocation, the checks), fork (the region's start to the later thread's start),
each thread's share, uneven (how far apart the two shares ended), join (the later end to the return), and what the
step's shares would have taken had both threads read at their own rates and ended together (`even end`).

With --step it traces whole compiled greedy (or --num-beams) generations of the default model instead (--backend
compile, 32 in / 64 new, the kernels it loads built with the trace, which notes decode attention's calls too): per
placement, the step's linears as above, its attention calls, the time between the calls by the calls around it
(q/k/v to attention: rotary and the cache's update; the MLP's gate/up to its down: the activation; the others:
residuals and norms), and the time outside them (the step's call to its first linear, its last linear to the call's
return, between steps).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, whatever the working folder
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernel_builds import OTHER, cases, load_other  # noqa: E402
from woq import cpu_lock  # noqa: E402

from llmbench.host import cpu_kind  # noqa: E402
from llmbench.placement import PlacedRound  # noqa: E402

BACKENDS = Path(__file__).resolve().parent.parent / "llmbench" / "backends"
KINDS = ("int4", "int8", "bf16", "fp16", "fp32")
TRACE = "-DLLMBENCH_CALL_TRACE=1"


def stages(trace):
    """(calls, 9) notes of call_trace() -> {stage: (calls,) float64 us}."""
    t = trace.double() / 1e3
    entry, region, s0, e0, s1, e1, leave = (t[:, i] for i in range(7))
    return {"set-up": region - entry, "fork": s0.maximum(s1) - region, "share t0": e0 - s0, "share t1": e1 - s1,
            "uneven": (e0 - e1).abs(), "join": leave - e0.maximum(e1), "call": leave - entry,
            # both threads at their own rates over the whole call, ending together: 1 / (1/(2 a) + 1/(2 b))
            "even end": 2 / (1 / (e0 - s0).clamp(min=1e-3) + 1 / (e1 - s1).clamp(min=1e-3))}


def report(kind: str, m: int, ins: list[int], nbytes: int, place, rounds: list[tuple[float, object]]) -> None:
    steps = [dt for dt, _ in rounds]
    at = f"the CPUs placed ~{place:.0f} ns apart" if place else "one placement"
    print(f"{kind}, {m} row{'s' * (m > 1)}: {len(rounds)} rounds with {at}; one step's linears "
          f"{min(steps) * 1e3:.2f} / {statistics.median(steps) * 1e3:.2f} ms best / median "
          f"({nbytes / min(steps) / 1e9:.1f} GB/s at best)")
    per_round = [stages(tr) for _, tr in rounds]
    names = list(per_round[0])
    shapes = rounds[0][1][:, 7].tolist()
    print(f"  {'out x in':>13} calls " + " ".join(f"{n:>9}" for n in names) + "   (us, medians of the calls)")
    for shape in sorted({(n, k) for n, k in zip(shapes, ins)}):
        pick = [i for i, s in enumerate(zip(shapes, ins)) if s == shape]
        cells = [statistics.median(r[n][i].item() for r in per_round for i in pick) for n in names]
        print(f"  {shape[0]:>6} x {shape[1]:<5}{len(pick):>5} " + " ".join(f"{c:9.2f}" for c in cells))
    sums = {n: statistics.median(r[n].sum().item() for r in per_round) / 1e3 for n in names}
    print("  a step (ms, medians of the rounds' sums): " + "  ".join(f"{n} {v:.3f}" for n, v in sums.items()))


def timeline(kinds: list[str], rows: list[int], seconds: float) -> None:
    import torch

    ops = getattr(torch.ops, OTHER)
    for kind, (weights, call, nbytes, ins) in cases(kinds).items():
        for m in rows:
            xs = {k: torch.randn(m, k, dtype=torch.bfloat16) for k in set(ins)}
            places: list[float | None] = []
            tagged: dict[object, list] = {}
            stop = time.monotonic() + seconds
            while time.monotonic() < stop:
                with PlacedRound(places) as where:
                    ops.call_trace()
                    start = time.perf_counter()
                    for w, k in zip(weights, ins):
                        call(ops, xs[k], w)
                    dt = time.perf_counter() - start
                    trace = ops.call_trace()
                if len(trace) == len(ins) and not where.moved:
                    tagged.setdefault(where.key, []).append((dt, trace))
            if not tagged:
                print(f"{kind}, {m} rows: the CPUs moved during every round")
            for place, rounds in tagged.items():
                report(kind, m, ins, nbytes, place, rounds)


def compiled_steps(woq: str | None, seconds: float, beams: int) -> None:
    """Compiled generations (greedy, or `beams` beams), each step's linears traced (the kernels built with
    LLMBENCH_CALL_TRACE)."""

    from llmbench.backends import direct_steps
    from llmbench.cli import RunConfig
    from llmbench.pipeline import open_pipeline, quiet_libraries

    quiet_libraries(verbose=False, no_progress=True)
    new = 64
    run = open_pipeline(RunConfig(device="cpu", dtype="bfloat16", woq=woq, backend="compile", quiet=True,
                                  input_tokens=32, max_new_tokens=new))
    backend, inputs = run.backend, run.inputs()
    if "streaming_linears" not in backend.details:
        raise SystemExit(f"the kernels did not load: {backend.details.get('streaming_linears_unavailable')}")
    backend.warm_up_shapes(inputs, new, beams)
    calls: list[tuple[int, int]] = []  # each direct step call's start and end (ns, the kernels' clock)
    direct = direct_steps.DirectStep.__call__

    def noted(self, ids, position):
        start = time.perf_counter_ns()  # CLOCK_MONOTONIC, as the kernels' steady_clock
        out = direct(self, ids, position)
        calls.append((start, time.perf_counter_ns()))
        return out

    direct_steps.DirectStep.__call__ = noted
    places, tagged = [], {}
    stop = time.monotonic() + seconds
    with cpu_lock(True):
        timed(backend, inputs, new, beams, stop, calls, tagged, places)
    mode = "greedy" if beams == 1 else f"beam {beams}"
    print(f"compiled {mode} steps, default model, bfloat16{' ' + woq if woq else ''}, 32 in / {new} new")
    for place, runs in tagged.items():
        step_report(runs, new - 1, place)


def timed(backend, inputs, new: int, beams: int, stop: float, calls: list, tagged: dict, places: list) -> None:
    import torch

    ops = torch.ops.llmbench_cpu
    while time.monotonic() < stop:
        ops.call_trace()
        calls.clear()
        with PlacedRound(places) as where:
            backend.generate(inputs, new, beams)
            trace = ops.call_trace()
        per = len(trace) // (new - 1)  # the prompt's one-row calls (INT4's output head) come first
        if per < 2 or not calls:
            raise SystemExit(f"{len(trace)} one-row linear calls traced and {len(calls)} direct step calls in "
                             f"{new - 1} steps: too few")
        trace = trace[len(trace) - per * (new - 1):]
        if not where.moved:
            tagged.setdefault(where.key, []).append((trace, torch.tensor(calls)))


def step_report(runs: list, steps: int, place) -> None:
    """Per placement: the steps' linears, the time between them by the shapes around it, and outside them."""
    import torch

    per = len(runs[0][0]) // steps
    at = f"the CPUs placed ~{place:.0f} ns apart" if place else "one placement"
    names = ("the step's call to its first linear", "its last linear to the return", "between steps")
    linears, gap_sums, between, outside, whole = [], [], {}, {n: [] for n in names}, []
    shape = runs[0][0][:per, 7].tolist()  # each call's outputs, or -1: decode attention (noted as one thread's)
    linear = torch.tensor([n >= 0 for n in shape])
    for trace, calls in runs:
        t = trace.double().reshape(steps, per, -1)
        linears.append(stages(t[:, linear].reshape(-1, t.shape[-1])))
        gaps = (t[:, 1:, 0] - t[:, :-1, 6]) / 1e3  # us from one call's return to the next one's entry
        for j in range(per - 1):
            between.setdefault((shape[j], shape[j + 1]), []).append(gaps[:, j])
        # each step's direct call: the one that began last before its first linear (steps through dynamo: none)
        c, first, last = calls.double() / 1e3, t[:, 0, 0] / 1e3, t[:, -1, 6] / 1e3
        k = torch.searchsorted(c[:, 0].contiguous(), first.contiguous()) - 1
        inside = (k >= 0) & (c[k.clamp(min=0), 1] >= last)
        k, first, last = k[inside], first[inside], last[inside]
        for name, part in zip(names, (first - c[k, 0], c[k, 1] - last, c[k[1:], 0] - c[k[:-1], 1])):
            outside[name].append(part)
        whole.append(c[k[1:], 0] - c[k[:-1], 0])
        gap_sums.append(gaps.sum(1))
    n = int(linear.sum())
    attention = [r[0].double().reshape(steps, per, -1)[:, ~linear] for r in runs]
    spent = torch.cat([(a[..., 6] - a[..., 0]).sum(1) for a in attention]).median().item() / 1e6 if (~linear).any() \
        else 0.0
    print(f"{len(runs)} generations with {at}: a step {torch.cat(whole).median().item() / 1e3:.2f} ms (median, one "
          f"step's call to the next's); its {n} linear calls (ms, medians of the steps' sums):")
    sums = {name: statistics.median(s[name][i * n:(i + 1) * n].sum().item() / 1e3 for s in linears
                                    for i in range(steps)) for name in linears[0]}
    print("  " + "  ".join(f"{name} {v:.3f}" for name, v in sums.items()))
    print(f"  its {per - n} decode attention calls {spent:.3f} ms; between the calls "
          f"{torch.cat(gap_sums).median().item() / 1e3:.3f} ms a step (medians), by the calls before and after (a "
          "linear's outputs or attention; us, medians; ms a step):")
    for (a, b), gaps in between.items():
        g = torch.cat(gaps)
        a, b = ("attention" if x < 0 else x for x in (a, b))
        print(f"    {a:>9} -> {b:<9} {len(gaps) // len(runs):>3} a step  {g.median().item():7.2f} us  "
              f"{g.median().item() * len(gaps) / len(runs) / 1e3:.3f} ms")
    print("  outside them (us, medians): " + "  ".join(f"{n} {torch.cat(v).median().item():.1f}"
                                                     for n, v in outside.items()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="bf16", help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--rows", default="1", help="rows of x (batch x beams), comma-separated, 1 to 8")
    p.add_argument("--seconds", type=float, default=60.0, help="how long to time each kind and number of rows")
    p.add_argument("--step", action="store_true", help="trace compiled greedy generations instead (bf16)")
    p.add_argument("--woq", choices=("int4", "int8"), help="with --step: weight-only quantized linears")
    p.add_argument("--num-beams", type=int, default=1, help="with --step: beam search's steps (1: greedy)")
    args = p.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        p.error(f"--kinds: a comma-separated choice of {', '.join(KINDS)}")
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error("--rows: comma-separated numbers of rows of x, e.g. 1,4")
    if args.woq and not args.step:
        p.error("--woq: with --step only (the linears alone time the kinds of --kinds)")
    if args.num_beams != 1 and not args.step or not 1 <= args.num_beams <= 8:
        p.error("--num-beams: 1 to 8, with --step only")
    if not rows or min(rows) < 1 or max(rows) > 8 or args.seconds <= 0:
        p.error("--rows: 1 to 8 rows each; --seconds: more than 0")
    import torch

    from llmbench.backends import cpu_kernels

    if torch.get_num_threads() < 2:
        raise SystemExit("call_timeline.py: torch runs one thread here; the timeline compares two threads' shares")
    if args.step:  # the compile backend loads the host's build: this one, with the trace
        os.environ["LLMBENCH_CPU_KERNEL_FLAGS"] = f"{os.environ.get('LLMBENCH_CPU_KERNEL_FLAGS', '')} {TRACE}"
        compiled_steps(args.woq, args.seconds, args.num_beams)
        return 0
    why = cpu_kernels.load()
    if why:
        raise SystemExit(why)
    load_other(BACKENDS, [TRACE])
    print(f"one decode step's linears, default model shapes; {cpu_kind().describe()}; {torch.get_num_threads()} "
          f"threads, the first two traced; {args.seconds:.0f} s per case")
    with cpu_lock(True):
        timeline(kinds, rows, args.seconds)
    return 0


if __name__ == "__main__":
    from llmbench.allocator import restart_with_allocator

    restart_with_allocator()  # the allocator run_generation.py takes (llmbench/allocator.py)
    raise SystemExit(main())
