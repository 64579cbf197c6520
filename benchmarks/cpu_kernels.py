#!/usr/bin/env python
"""The per-CPU choices of the compile backend's weight-streaming kernels (llmbench/backends/cpu_kernels.py),
measured side by side on this host under the CPU lock.

    python benchmarks/cpu_kernels.py --prefetch   # the kernels built with each prefetch hint: one step's linears
    python benchmarks/cpu_kernels.py --step       # one-row linears as generated reductions vs the kernels
    python benchmarks/cpu_kernels.py --amx        # bf16 linears of 1-8 rows: AMX tiles vs vdpbf16ps
    python benchmarks/cpu_kernels.py --prefill [--dtype float32]  # prefill linears: the kernels vs F.linear
    python benchmarks/cpu_kernels.py --int8       # int8 linears of 1-64 rows: as stored vs tiles of eight rows
    python benchmarks/cpu_kernels.py --stream     # one step's plain linears vs the same bytes in large ones vs a sum

--prefetch times every linear layer of the default model's decode step (random weights of its shapes, INT4 g32 and
bf16, one input row), once per build of the kernels (prefetchnta, prefetcht2, prefetcht0, for the weight rows and
the INT4 tiles alike), each build in its own process, alternating for --rounds rounds; best and median per build,
and the weight bytes streamed per second. A CPU whose last-level cache holds the default model's weights (the AMX
Xeon's: 480 MiB) serves them from there: --beyond-cache reads its layers over and over, twice that cache in all, so
that they stream from memory as a larger model's do.
--step compiles the default model's greedy decode step twice in one process (one-row linears as inductor's
generated reductions, and as the kernels), alternates whole generations (32 in, 64 new) and prints ms/token, their
ratio, and how many greedy tokens the two agree on.
--amx (CPUs with AMX_BF16) times one step's bf16 linears with 1, 2, 3, 4 and 8 rows of x (batch x beams) on AMX
tiles (LLMBENCH_AMX_MIN_ROWS=1) and through the vdpbf16ps kernel (LLMBENCH_AMX_MIN_ROWS=0), each in its own
process, alternating for --rounds rounds, and prints the AMX/vdpbf16ps ratio of best times per row count.
--prefill times one prefill's linears (--dtype; every layer's, not the output head) of 8 to 256 rows (prompt tokens
x batch) through torch's F.linear (oneDNN, MKL) and the kernels (64 rows a call; bf16 on AMX CPUs: tiles),
alternating in one process: what kernel_linears' prompt limits rest on.
--int8 times one step's int8 linears (per-row scales) with 1, 2, 4, 8, 16 and 64 rows of x, TorchAO's layout as
stored (linear_int8) against tiles of eight rows (linear_int8_tiles), alternating in one process for --rounds rounds,
and prints the tiles/stored ratio of best times.
--stream (--dtype) times one step's plain linears (linear_dense, one row), its INT4 g32 linears (linear_int4), the
same number of weights as eight large linears (as many rows, the default model's 576 inputs), and a 1 GiB float32
sum, interleaved in one process for --iters rounds, and prints GB/s for each (best / median) with their ratios to
the sum: what the kernels stream alone, and what a step's many short calls keep of it, per placement of the CPUs
(llmbench.placement; rounds that straddle a move left out); then the rate of calls by weight size (N rows).
The weights of --prefetch, --amx, --prefill, --int8 and --stream lie in huge pages as the compile backend places them
(llmbench/backends/huge_pages.py; LLMBENCH_HUGE_PAGES=0: plain pages): on plain 4 KiB pages the page walks hide
how fast each kernel streams (one step's bf16 linears on the AMX Xeon, 8 rows on AMX tiles against one row: 1.00x
on plain pages, 1.27x in huge pages, as in a compiled step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, whatever the working folder
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from woq import cpu_lock, default_config, leading_agreement  # noqa: E402

from llmbench.host import cpu_kind, last_level_cache_bytes  # noqa: E402

HINTS = {"nta": "0", "t2": "1", "t0": "3"}  # __builtin_prefetch's locality


def placed():
    """-> a function that moves a weight into huge pages as the compile backend does (LLMBENCH_HUGE_PAGES=0: keeps
    it), and the arena (None without huge pages) that holds them."""
    from llmbench.backends.huge_pages import weights_arena

    arena = weights_arena()
    return (arena.place if arena else (lambda t: t)), arena


def step_shapes() -> list[tuple[int, int]]:
    """(out, in) of every linear of one decode step of the default model (q/k/v and gate/up fused, as the
    kernels run them) and its output head."""
    from llmbench.roofline import head_size

    c = default_config()
    kv = c.num_key_value_heads * head_size(c)
    layer = [(c.hidden_size + 2 * kv, c.hidden_size), (c.hidden_size, c.hidden_size),
             (2 * c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size)]
    return layer * c.num_hidden_layers + [(c.vocab_size, c.hidden_size)]


def beyond_cache(shapes: list[tuple[int, int]], bytes_per_weight: float) -> list[tuple[int, int]]:
    """step_shapes() with its layers read over and over, so that a step's weights (bytes_per_weight each) are twice
    the CPU's last-level cache: then they stream from memory, as a larger model's do."""
    layers, head = shapes[:-1], shapes[-1:]
    size = sum(n * k for n, k in layers) * bytes_per_weight
    return layers * max(1, -(-2 * (last_level_cache_bytes() or 0) // int(size))) + head


def time_linears(rounds: int, rows: int = 1, kinds: str = "int4,bf16", from_memory: bool = False) -> dict:
    """One process, one build (LLMBENCH_CPU_KERNEL_FLAGS): best and median seconds of one step's linears (with
    from_memory, of as many layers as stream from memory rather than the last-level cache: beyond_cache)."""
    import torch

    from llmbench.backends import cpu_kernels, int4_layout

    why = cpu_kernels.load()
    if why:
        raise SystemExit(why)
    ops = torch.ops.llmbench_cpu
    torch.manual_seed(0)
    gs, shapes = 32, step_shapes()
    int4_shapes = (beyond_cache(shapes, 0.5) if from_memory else shapes) if "int4" in kinds else []
    bf16_shapes = (beyond_cache(shapes, 2) if from_memory else shapes) if "bf16" in kinds else []
    place, _ = placed()
    int4 = [place(int4_layout.int4_rows(torch.randint(0, 16, (n, k)), torch.rand(n, k // gs, dtype=torch.bfloat16),
                                        torch.rand(n, k // gs, dtype=torch.bfloat16), ops.int4_tile_rows())[0])
            for n, k in int4_shapes]
    bf16 = [place(torch.randn(n, k, dtype=torch.bfloat16)) for n, k in bf16_shapes]
    xs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for _, k in shapes}
    cases = {
        "int4": (lambda: [ops.linear_int4(xs[k], packed, gs, 2, None) for packed, (_, k) in zip(int4, int4_shapes)],
                 sum(packed.numel() for packed in int4)),
        "bf16": (lambda: [ops.linear_dense(xs[k], w, None) for w, (_, k) in zip(bf16, bf16_shapes)],
                 sum(2 * w.numel() for w in bf16)),
    }
    out = {}
    for name, (run, nbytes) in cases.items():
        if name not in kinds:
            continue
        run()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        out[name] = {"best": min(times), "median": statistics.median(times), "bytes": nbytes}
    return out


def child(args: list[str], env: dict, what: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", "10", *args], env={**os.environ, **env},
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"the {what} run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prefetch(rounds: int, beyond: list[str]) -> None:
    """Each hint for the rows' and the INT4 tiles' prefetches alike (the kernels' own defaults come first in the
    build's flags; the later -D wins)."""
    from llmbench.backends import cpu_kernels

    results: dict[str, list[dict]] = {hint: [] for hint in HINTS}
    for _ in range(rounds):
        for hint, level in HINTS.items():
            flags = f"-DLLMBENCH_PREFETCH_LOCALITY={level} -DLLMBENCH_TILE_PREFETCH_LOCALITY={level}"
            results[hint].append(child(beyond, {"LLMBENCH_CPU_KERNEL_FLAGS": flags}, f"{hint} build"))
    print(f"one decode step's linears, default model shapes{', beyond the cache' if beyond else ''}, 1 row; "
          f"{cpu_kind().describe()}; {rounds} alternating processes per build; this CPU's choice: "
          f"{cpu_kernels.prefetch_hint()}")
    for case in ("int4", "bf16"):
        best = {}
        for hint, runs in results.items():
            best[hint] = min(r[case]["best"] for r in runs)
            median = statistics.median(r[case]["median"] for r in runs)
            rate = runs[0][case]["bytes"] / best[hint] / 1e9
            print(f"  {case} prefetch{hint:<3}  best {best[hint] * 1e3:6.2f} ms ({rate:5.1f} GB/s)  median "
                  f"{median * 1e3:6.2f} ms")
        print(f"  {case} best-time ratios to nta: " + ", ".join(f"{h} {best[h] / best['nta']:.3f}" for h in HINTS))


def amx(rounds: int, beyond: list[str]) -> None:
    rows = (1, 2, 3, 4, 8)
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for r in rows:
            for name, value in (("vdpbf16ps", "0"), ("amx", "1")):
                found = child(["--rows", str(r), *beyond], {"LLMBENCH_AMX_MIN_ROWS": value}, name)
                results.setdefault((name, r), []).append(found["bf16"])
    print(f"one decode step's bf16 linears, default model shapes{', beyond the cache' if beyond else ''}; "
          f"{cpu_kind().describe()}; {rounds} alternating "
          "processes per case")
    for r in rows:
        best = {}
        for name in ("vdpbf16ps", "amx"):
            runs = results[(name, r)]
            best[name] = min(x["best"] for x in runs)
            print(f"  {r} rows {name:<10} best {best[name] * 1e3:6.2f} ms ({runs[0]['bytes'] / best[name] / 1e9:5.1f} "
                  f"GB/s)  median {statistics.median(x['median'] for x in runs) * 1e3:6.2f} ms")
        print(f"  {r} rows amx/vdpbf16ps best-time ratio: {best['amx'] / best['vdpbf16ps']:.3f}")


def prefill(iters: int, dtype_name: str) -> None:
    import torch
    import torch.nn.functional as F

    from llmbench.backends import cpu_kernels

    why = cpu_kernels.load()
    if why:
        raise SystemExit(why)
    torch.manual_seed(0)
    shapes = step_shapes()[:-1]
    place, arena = placed()
    weights = [place(torch.randn(n, k, dtype=getattr(torch, dtype_name))) for n, k in shapes]
    print(f"one prefill's {dtype_name} linears, default model shapes; {cpu_kind().describe()}; {iters} alternating "
          f"rounds; weights: {arena.describe() if arena else 'plain pages (LLMBENCH_HUGE_PAGES=0)'}")
    for rows in (8, 16, 32, 64, 128, 256):
        xs = {k: torch.randn(rows, k, dtype=weights[0].dtype) for _, k in shapes}
        cases = {"library": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
                 "kernels": lambda: [torch.ops.llmbench_cpu.linear_dense(x, w, None) for w in weights
                                     for x in xs[w.shape[1]].split(64)]}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for run in cases.values():
            run()
        for _ in range(iters):
            for name, run in cases.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        for name, ts in times.items():
            print(f"  {rows} rows {name:<7} best {min(ts) * 1e3:6.2f}  median {statistics.median(ts) * 1e3:6.2f} ms")
        print(f"  {rows} rows kernels/library best-time ratio: {min(times['kernels']) / min(times['library']):.3f}")


def step(dtype: str, iters: int) -> None:
    import torch

    from llmbench.cli import RunConfig
    from llmbench.pipeline import open_pipeline, quiet_libraries

    quiet_libraries(verbose=False, no_progress=True)
    config = RunConfig(device="cpu", dtype=dtype, backend="compile", num_beams=1, input_tokens=32,
                       max_new_tokens=64, quiet=True)
    backends, inputs = {}, None
    for name in ("reductions", "kernels"):  # the variable is read while the backend is prepared
        os.environ["LLMBENCH_ONE_ROW_DENSE"] = name
        run = open_pipeline(config)
        inputs = run.inputs() if inputs is None else inputs
        backends[name] = run.backend
        run.backend.warm_up_shapes(inputs, 64, 1)
    os.environ.pop("LLMBENCH_ONE_ROW_DENSE")
    times: dict[str, list[float]] = {name: [] for name in backends}
    ids = {}
    with cpu_lock(True):
        for _ in range(iters):
            for name, backend in backends.items():
                start = time.perf_counter()
                ids[name] = backend.generate(inputs, 64, 1, None)
                times[name].append((time.perf_counter() - start) / 64)
    same = leading_agreement(ids["kernels"][0, inputs.num_tokens:].tolist(),
                             ids["reductions"][0, inputs.num_tokens:].tolist())
    print(f"greedy decode, default model, {dtype}, 32 in / 64 new, {iters} alternating generations; "
          f"{cpu_kind().describe()}")
    for name, ts in times.items():
        print(f"  one-row linears as {name:<10}  best {min(ts) * 1e3:6.2f}  median {statistics.median(ts) * 1e3:6.2f} "
              f"ms/token")
    print(f"  kernels/reductions: best {min(times['kernels']) / min(times['reductions']):.3f}, median "
          f"{statistics.median(times['kernels']) / statistics.median(times['reductions']):.3f}; greedy tokens "
          f"equal: {same} of 64 ({torch.__version__})")


def stream(dtype: str, iters: int) -> None:
    import torch

    from llmbench.backends import cpu_kernels, int4_layout
    from llmbench.placement import PlacedRound

    why = cpu_kernels.load()
    if why:
        raise SystemExit(why)
    ops, place, shapes = torch.ops.llmbench_cpu, placed()[0], step_shapes()
    torch.manual_seed(0)
    weights = [place(torch.randn(n, k).to(getattr(torch, dtype))) for n, k in shapes]
    int4 = [place(int4_layout.int4_rows(torch.randint(0, 16, (n, k)), torch.rand(n, k // 32, dtype=torch.bfloat16),
                                        torch.rand(n, k // 32, dtype=torch.bfloat16), ops.int4_tile_rows())[0])
            for n, k in shapes]
    k = shapes[0][1]
    large = [place(torch.randn(sum(n * kk for n, kk in shapes) // k // 8, k).to(weights[0].dtype)) for _ in range(8)]
    xs = {kk: torch.randn(1, kk).to(weights[0].dtype) for _, kk in shapes}
    total = torch.ones(1 << 28)
    cases = {"step's linears": (lambda: [ops.linear_dense(xs[w.shape[1]], w, None) for w in weights], weights),
             "INT4 g32 linears": (lambda: [ops.linear_int4(xs[kk], w, 32, 2, None) for w, (_, kk) in
                                           zip(int4, shapes)], int4),
             "8 large linears": (lambda: [ops.linear_dense(xs[k], w, None) for w in large], large),
             "1 GiB sum": (total.sum, [total])}
    [run() for run, _ in cases.values()]  # warm-up
    places, rounds = [], []  # each round tagged by where the CPUs sat (llmbench.placement), straddling ones left out
    for _ in range(iters):
        with PlacedRound(places) as where:
            times = {name: timed(run) for name, (run, _) in cases.items()}
        if not where.moved:
            rounds.append((where.key, times))
    print(f"one row, {dtype}, {iters} interleaved rounds; {cpu_kind().describe()}; {torch.get_num_threads()} threads")
    for where in places:
        kept = [t for p, t in rounds if p == where]
        print(f" {len(kept)} rounds with the CPUs placed ~{where:.0f} ns apart (llmbench.placement)" if where else "")
        rates = {}
        for name, (_, tensors) in cases.items():
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            seconds = [t[name] for t in kept]
            rates[name] = (nbytes, nbytes / min(seconds) / 1e9, nbytes / statistics.median(seconds) / 1e9)
        _, sum_best, sum_median = rates["1 GiB sum"]
        for name, (nbytes, best, median) in rates.items():
            print(f"  {name:<16} {nbytes / 1e6:7.1f} MB  best {best:5.1f} GB/s ({best / sum_best:.0%} of the sum)  "
                  f"median {median:5.1f} GB/s ({median / sum_median:.0%})")
    for held in (weights, large, int4):
        held.clear()  # their memory, for what follows
    print(f"  one call per weight of N x {k}, as many weights as make 160 MB, best of 6:")
    for n in (64, 256, 576, 1024, 3072, 8192, 32768):
        copies = [place(torch.randn(n, k).to(xs[k].dtype)) for _ in range(max(2, 160_000_000 // (n * k * 2)))]
        best = min(timed(lambda: [ops.linear_dense(xs[k], w, None) for w in copies]) for _ in range(6))
        nbytes = copies[0].numel() * copies[0].element_size()
        print(f"    N {n:6d} {nbytes / 1e3:8.0f} KB  {best / len(copies) * 1e6:8.1f} us a call  "
              f"{nbytes * len(copies) / best / 1e9:5.1f} GB/s")
        copies.clear()


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def int8(rounds: int) -> None:
    import torch

    from llmbench.backends import cpu_kernels

    why = cpu_kernels.load()
    if why or not torch.ops.llmbench_cpu.int8_tiles_built():
        raise SystemExit(why or "--int8: the kernels were built without AVX2 (no tiles)")
    ops, place = torch.ops.llmbench_cpu, placed()[0]
    torch.manual_seed(0)
    layers = []
    for n, k in step_shapes():
        q, scale = torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n, 1) / 64
        layers.append((place(q), place(scale), place(cpu_kernels.int8_tiles(q, scale)), k))
    print(f"one decode step's int8 linears, default model shapes; {cpu_kind().describe()}; best of {rounds}, "
          "alternating in one process")
    for rows in (1, 2, 4, 8, 16, 64):
        xs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for *_, k in layers}
        forms = {"stored": lambda: [ops.linear_int8(xs[k], q, s, None) for q, s, _, k in layers],
                 "tiles": lambda: [ops.linear_int8_tiles(xs[k], t, 1, None) for _, _, t, k in layers]}
        best = dict.fromkeys(forms, float("inf"))
        for _ in range(rounds):
            for name, run in forms.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        print(f"  {rows:2d} rows: as stored {best['stored'] * 1e3:7.2f} ms, tiles {best['tiles'] * 1e3:7.2f} ms, "
              f"tiles/stored {best['tiles'] / best['stored']:.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefetch", action="store_true")
    p.add_argument("--step", action="store_true")
    p.add_argument("--amx", action="store_true")
    p.add_argument("--prefill", action="store_true")
    p.add_argument("--int8", action="store_true")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--beyond-cache", action="store_true",
                   help="--prefetch, --amx: the layers read over and over, twice the last-level cache in all, so "
                        "that the weights stream from memory as a larger model's do")
    p.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kinds = "bf16" if args.rows else "int4,bf16"
        print(json.dumps(time_linears(args.child, args.rows or 1, kinds, args.beyond_cache)))
        return 0
    if args.beyond_cache and not last_level_cache_bytes():
        p.error("--beyond-cache: this CPU's last-level cache size cannot be read (/sys/devices/system/cpu)")
    beyond = ["--beyond-cache"] if args.beyond_cache else []
    if not (args.prefetch or args.step or args.amx or args.prefill or args.int8 or args.stream):
        p.error("choose --prefetch, --step, --amx, --prefill, --int8, --stream or several")
    if args.amx and "amx_bf16" not in cpu_kind().flags:
        p.error("--amx: this CPU has no AMX_BF16")
    if args.prefetch:
        with cpu_lock(True):
            prefetch(args.rounds, beyond)
    if args.amx:
        with cpu_lock(True):
            amx(args.rounds, beyond)
    if args.prefill:
        with cpu_lock(True):
            prefill(args.iters, args.dtype)
    if args.int8:
        with cpu_lock(True):
            int8(max(args.rounds, 10))
    if args.stream:
        with cpu_lock(True):
            stream(args.dtype, max(args.iters, 20))
    if args.step:
        step(args.dtype, args.iters)
    return 0


if __name__ == "__main__":
    from llmbench.allocator import restart_with_allocator

    restart_with_allocator()  # the allocator run_generation.py takes (llmbench/allocator.py)
    raise SystemExit(main())
