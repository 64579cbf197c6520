#!/usr/bin/env python
"""Two builds of the CPU decode kernels (llmbench/backends/cpu_gemv.cpp) side by side in one process, under the CPU
lock: the host's own build, and the same source (or --source, a changed copy of its folder) built with --flags on top
of the host's, its ops loaded as another namespace.

    python benchmarks/kernel_builds.py --flags=-DLLMBENCH_PREFETCH_TILES=2
    python benchmarks/kernel_builds.py --flags="-DLLMBENCH_EVEN_SPLIT_ROWS=8 -DLLMBENCH_ONE_ROW_STREAMS=1"
    python benchmarks/kernel_builds.py --source /tmp/changed/llmbench/backends --kinds int4 --rows 1,4
    python benchmarks/kernel_builds.py --source /tmp/changed/llmbench/backends --kinds attention --rows 1,4,8

Times one decode step's linears of the default model's shapes (random weights in huge pages, as the compile backend
places them; its output head too) for each kind (int4: g32 tiles, int8: tiles, bf16 / fp16 / fp32: plain weights)
and number of rows of x (batch x beams), or its 30 decode attention calls (attention: bf16, 64 positions of a static
cache of 96 attended; cpu_attention.cpp in both builds), the two builds alternating round by round, and prints each
build's best and median ms, the host build's GB/s, and the median of the per-round time ratios (other / host's),
with whether their outputs agree.
Where memory and cores change speed from one minute to the next (a shared cloud host), two processes run one after
the other can differ by more than what is compared; two builds that share every round do not. Each round is tagged
by where the CPUs sat before and after it (llmbench.placement), and the figures are printed per placement (rounds
that straddle a move of the CPUs left out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, whatever the working folder
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpu_kernels import placed, step_shapes  # noqa: E402
from woq import cpu_lock, default_config  # noqa: E402

from llmbench.host import cpu_kind  # noqa: E402
from llmbench.placement import PlacedRound  # noqa: E402

OTHER = "llmbench_other"  # the second build's ops' namespace (cpu_gemv.cpp's LLMBENCH_OPS)
DENSE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # plain weights, by kind


def load_other(source: Path, flags: list[str]) -> None:
    """Build (once per source and flags) and load `source`'s cpu_gemv.cpp with the host's flags, then `flags`."""
    from llmbench.backends import cpu_kernels
    from llmbench.backends.ops_build import build

    if not (source / "cpu_gemv.cpp").exists():
        raise SystemExit(f"--source {source}: no cpu_gemv.cpp there (give the folder of a copy of the kernels)")
    sources = [source / "cpu_gemv.cpp"]
    attention = source / "cpu_attention.cpp"
    if attention.exists() and "LLMBENCH_OPS" in attention.read_text():  # older copies register llmbench_cpu's
        sources.append(attention)
    why = build("llmbench_other", sources,
                [*cpu_kernels.host_flags(), *flags, f"-DLLMBENCH_OPS={OTHER}"],
                f"the other kernels ({' '.join(flags) or 'no extra flags'})")
    if why:
        raise SystemExit(f"the other kernels could not be built ({why})")


def cases(kinds: list[str]):
    """-> {kind: (weights, call(ops, x, weight), their bytes, their in_features)}: one step's linears, default model."""
    import torch

    from llmbench.backends import cpu_kernels, int4_layout

    torch.manual_seed(0)
    place, shapes = placed()[0], step_shapes()
    out = {}
    # INT4 and INT8 packed for each build's tiles (16 rows where AVX-512 VNNI is built in, else 8)
    if "int4" in kinds:
        scales = [torch.rand(n, k // 32, dtype=torch.bfloat16) / 64 for n, k in shapes]  # bfloat16: 2 bytes each
        q = [torch.randint(0, 16, s.shape[:1] + (k,)) for s, (_, k) in zip(scales, shapes)]
        builds = {tile_rows(torch.ops.llmbench_cpu), tile_rows(getattr(torch.ops, OTHER))}
        packed = [{t: place(int4_layout.int4_rows(qi, s, s, t)[0]) for t in builds} for qi, s in zip(q, scales)]
        out["int4"] = (packed, lambda ops, x, w: ops.linear_int4(x, w[tile_rows(ops)], 32, 2, None))
    if "int8" in kinds and torch.ops.llmbench_cpu.int8_tiles_built():
        q8 = [(torch.randint(-128, 128, (n, k), dtype=torch.int8), torch.rand(n, 1) / 64) for n, k in shapes]
        builds = {tile_rows(torch.ops.llmbench_cpu, "int8"), tile_rows(getattr(torch.ops, OTHER), "int8")}
        tiles = [{t: place(cpu_kernels.int8_tiles(q, s, t)) for t in builds} for q, s in q8]
        out["int8"] = (tiles, lambda ops, x, w: ops.linear_int8_tiles(x, w[tile_rows(ops, "int8")], 1, None))
    for kind, dtype in DENSE.items():
        if kind in kinds:
            dense = [place(torch.randn(n, k, dtype=getattr(torch, dtype)) / 32) for n, k in shapes]
            out[kind] = (dense, lambda ops, x, w: ops.linear_dense(x, w, None))
    def nbytes(weights) -> int:  # INT4's and INT8's: one build's packing (the same bytes in either)
        return sum(w.numel() * w.element_size() for w in
                   (w if isinstance(w, torch.Tensor) else next(iter(w.values())) for w in weights))

    return {kind: (weights, call, nbytes(weights), [k for _, k in shapes]) for kind, (weights, call) in out.items()}


def attention_step(rows: int, kept: int = 64, length: int = 96):
    """-> (step(ops), bytes): one decode step's attention calls, default model, `rows` rows against a static cache of
    `length` positions of which the first `kept` are attended (32 in / 64 new, halfway), a cache per layer."""
    import torch

    from llmbench.roofline import head_size

    c = default_config()
    dim = head_size(c)
    mask = torch.zeros(rows, 1, 1, length, dtype=torch.bool)
    mask[..., :kept] = True
    layers = [(torch.randn(rows, 1, c.num_attention_heads, dim, dtype=torch.bfloat16).transpose(1, 2),
               *(torch.randn(rows, c.num_key_value_heads, length, dim, dtype=torch.bfloat16) for _ in range(2)))
              for _ in range(c.num_hidden_layers)]

    def step(ops):
        return [ops.decode_attention(q, k, v, mask, dim ** -0.5) for q, k, v in layers]

    return step, sum(k.nbytes + v.nbytes for _, k, v in layers) * kept // length


def linear_step(case, rows: int):
    """-> (step(ops), bytes): one decode step's linears of a kind (a cases() entry) against `rows` rows of x."""
    import torch

    weights, call, nbytes, ins = case
    first = weights[0] if isinstance(weights[0], torch.Tensor) else None  # plain weights: x in their dtype
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.bfloat16
    xs = {k: torch.randn(rows, k, dtype=dtype) for k in set(ins)}

    def step(ops):
        return [call(ops, xs[k], w) for w, k in zip(weights, ins)]

    return step, nbytes


def tile_rows(ops, kind: str = "int4") -> int:
    """Rows per INT4 or INT8 tile in a build's layout (8 in sources from before its 16-row tiles)."""
    found = getattr(ops, f"{kind}_tile_rows", None)
    return found() if found is not None else 8


def compare(kinds: list[str], rows: list[int], rounds: int) -> None:
    import torch

    host, other = torch.ops.llmbench_cpu, getattr(torch.ops, OTHER)
    linears = cases([k for k in kinds if k != "attention"])
    for kind in kinds:
        if kind != "attention" and kind not in linears:
            print(f"  {kind}: not in this build (INT8 tiles need AVX2)", flush=True)
            continue
        for m in rows:
            step, nbytes = attention_step(m) if kind == "attention" else linear_step(linears[kind], m)
            agree = all(torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2)
                        for a, b in zip(step(host), step(other)))
            times: dict[str, list[float]] = {"host": [], "other": []}
            places: list[float | None] = []  # each round's placement of the CPUs (llmbench.placement)
            where = []
            for r in range(rounds):
                with PlacedRound(places) as this_round:
                    for name, ops in ((("host", host), ("other", other)) if r % 2 == 0 else
                                      (("other", other), ("host", host))):
                        start = time.perf_counter()
                        step(ops)
                        times[name].append(time.perf_counter() - start)
                where.append(this_round.key)  # None: it moved (or round trips cannot be measured)
            if not places:
                print(f"  {kind} {m} rows: the CPUs moved during every round", flush=True)
            for place in places:  # rounds that straddled a move of the CPUs are left out
                a = [t for t, w in zip(times["host"], where) if w == place]
                b = [t for t, w in zip(times["other"], where) if w == place]
                ratio = statistics.median(y / x for x, y in zip(a, b))
                at = f", {len(a)} rounds with the CPUs ~{place:.0f} ns apart" if place else ""
                print(f"  {kind} {m} rows: host's {min(a) * 1e3:6.2f} / {statistics.median(a) * 1e3:6.2f} ms "
                      f"({nbytes / min(a) / 1e9:5.1f} GB/s), other {min(b) * 1e3:6.2f} / "
                      f"{statistics.median(b) * 1e3:6.2f} ms, other/host {ratio:.3f} (median of rounds{at})"
                      f"{'' if agree else ', OUTPUTS DIFFER'}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flags", default="", help="-D or -m flags for the other build, after the host's own "
                                                "(written --flags=-D...)")
    p.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent / "llmbench" / "backends",
                   help="the folder of the other build's cpu_gemv.cpp and headers (default: this checkout's)")
    p.add_argument("--kinds", default="int4,int8,bf16")
    p.add_argument("--rows", default="1,4,8")
    p.add_argument("--rounds", type=int, default=21)
    args = p.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - {"int4", "int8", *DENSE, "attention"}:
        p.error(f"--kinds: a comma-separated choice of int4, int8, {', '.join(DENSE)}, attention")
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error("--rows: comma-separated numbers of rows of x, e.g. 1,4,8")
    if not rows or min(rows) < 1 or max(rows) > 8 or args.rounds < 1:
        p.error("--rows: 1 to 8 rows each (a decode step's); --rounds: at least 1")
    from llmbench.backends import cpu_kernels

    why = cpu_kernels.load()
    if why:
        raise SystemExit(why)
    load_other(args.source, args.flags.split())
    print(f"one decode step's linears or attention calls, default model shapes; {cpu_kind().describe()}; host's build "
          f"({' '.join(cpu_kernels.host_flags())}) against other ({args.flags or 'no extra flags'}"
          f"{'' if args.source == p.get_default('source') else ', ' + str(args.source)}), {args.rounds} rounds "
          "alternating in one process; best / median ms")
    with cpu_lock(True):
        compare(kinds, rows, args.rounds)
    return 0


if __name__ == "__main__":
    from llmbench.allocator import restart_with_allocator

    restart_with_allocator()  # the allocator run_generation.py takes (llmbench/allocator.py)
    raise SystemExit(main())
