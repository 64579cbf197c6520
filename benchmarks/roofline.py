#!/usr/bin/env python
"""One table for this host: eager / compile / ipex x fp32 / bf16 / INT8 / INT4 in ms/token and % of the memory
roofline, with llama.cpp Q4_1 and F16 on the same weights beside them, in one run under the CPU lock.

    python benchmarks/roofline.py                      # every case (cold compiles take minutes each)
    python benchmarks/roofline.py --schemes bf16 --backends eager --num-iter 1 --no-anchor     # a quick check
    python benchmarks/roofline.py --schemes bf16,fp16 --backends compile    # fp16 beside bf16 (optional scheme)
    python benchmarks/roofline.py -m microsoft/Phi-3-mini-128k-instruct --dummy-weights --backends compile \
        --max-new-tokens 16 --num-iter 2     # a real-size model's random weights: memory-bound on any CPU cache

The CPU kind heads the table. The read bandwidth is measured again under the lock (llmbench.roofline: a 1 GiB float32
sum, best of 10) and refreshes this host's cache, so later records use the best figure seen; it is measured again
after the cases, and the cores' speed beside it both times (llmbench.core_speed, as a share of this host's best):
a table whose figures fell short of either was timed on a busy host. Every case runs the
run_generation.py pipeline (benchmarks/woq.py's run_one: load, quantize, prepare and compile outside the lock; time
greedy decoding inside it). Roofline = bytes one decode step reads (weights + KV cache at the mean decode position)
/ read bandwidth; % of roofline = roofline / measured mean next-token latency. llama.cpp (../shared/anchors/
llama_bench.sh, 64 tokens after 32 of context) runs the default model's GGUF: Q4_1 as shipped and F16 converted from
it; its roofline counts the GGUF's tensor bytes (an input embedding that is not the output head excluded) and an F16
KV cache at the mean position, 64. A CPU whose last-level cache holds a step's bytes may serve them from there (the
table's note names those rows): a model of real size (-m ID --dummy-weights) shows the memory-bound figures.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, whatever the working folder

from woq import LOCK, add_case_args, cpu_lock, default_config, run_anchor, run_one  # noqa: E402

from llmbench.allocator import loaded  # noqa: E402
from llmbench.bandwidth_cache import cached_cpu_figure, note_cpu_reading  # noqa: E402
from llmbench.core_speed import core_share, host_best, measure_core_speed  # noqa: E402
from llmbench.devices import resolve_device  # noqa: E402
from llmbench.host import cpu_kind, last_level_cache_bytes  # noqa: E402
from llmbench.main import quiet_libraries  # noqa: E402
from llmbench.placement import host_placements, moved, placement_of, round_trip_ns  # noqa: E402
from llmbench.roofline import OVERRIDE_ENV, device_bandwidth, kv_cache_bytes_per_position  # noqa: E402

SCHEMES = ("fp32", "bf16", "int8", "int4")  # the default set; woq.KNOWN_SCHEMES adds fp16
ANCHOR_TYPES = ("q4_1", "f16")
ANCHOR_MEAN_CONTEXT = 32 + 64 / 2  # llama-bench tg64 at depth 32


def default_backends() -> str:
    from backends import available_backends  # benchmarks/backends.py: ipex only with a matching torch/transformers

    return ",".join(available_backends())


def gguf_bytes_read(path: Path) -> int:
    """Tensor bytes of a GGUF file one decode step reads: all but an input embedding that is not the output head."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    untied = "output.weight" in tensors
    return sum(n for name, n in tensors.items() if not (untied and name == "token_embd.weight"))


def anchor_rows(args) -> list[dict]:
    """llama.cpp on the default model's weights, Q4_1 and F16, timed under the lock."""
    kv = kv_cache_bytes_per_position(default_config(), torch.float16)
    rows = []
    for anchor_type in ANCHOR_TYPES:
        print(f"[llama.cpp {anchor_type}] running ...", file=sys.stderr, flush=True)
        with cpu_lock(not args.no_lock):
            placement = [round_trip_ns()]  # where the CPUs sat, as for every case
            found = run_anchor(args.anchor_allow_busy, args.anchor_script, anchor_type)
            placement.append(round_trip_ns())
        if found is None:
            rows.append({"backend": "llama.cpp", "scheme": anchor_type, "error": "did not run (see above)"})
            continue
        ms, gguf = found
        read = gguf_bytes_read(gguf) + int(kv * ANCHOR_MEAN_CONTEXT) if gguf else None
        rows.append({"backend": "llama.cpp", "scheme": anchor_type.upper(), "dtype": "gguf", "next_ms": ms,
                     "bytes_read": read, "compile_s": None, "placement_ns": placement})
    return rows


def print_table(rows: list[dict], gb_s: float, run_gb_s: float | None = None) -> None:
    """`gb_s`: the host's read bandwidth (the best seen), the roofline's; a row's `run_gb_s`: the bandwidth measured
    right after its case (else `run_gb_s`, the mean of this run's measurements before and after the cases), which a
    shared host lowers: "% of run bw" is the share of that bandwidth a case reached; a row's `cores_share`: the
    cores' speed right after its case as a share of this host's best (llmbench.core_speed); its `placement_ns`: a
    cache line's round trip between two CPUs before and after its case (llmbench.placement: where a hypervisor
    moved them, the two differ, and so do the memory bandwidth and the cost of every hand-over between threads);
    "% of place bw": the share of the best bandwidth this host has read with its CPUs placed as after the case."""
    print(f"\n{'backend':<10}{'scheme':<7}{'dtype':<10}{'ms/token':>9}{'roofline ms':>12}{'% of roofline':>14}"
          f"{'% of run bw':>12}{'% of place bw':>14}{'MB read/token':>14}{'compile s':>10}{'cores %':>8}"
          f"{'CPUs ns':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<10}{r['scheme']:<7}failed: {r['error']}")
            continue
        roofline_ms = r["bytes_read"] / (gb_s * 1e9) * 1e3 if r["bytes_read"] and gb_s else None
        roofline = f"{roofline_ms:.2f}" if roofline_ms else "-"
        share = f"{roofline_ms / r['next_ms'] * 100:.0f}%" if roofline_ms else "-"
        case_gb_s = r.get("run_gb_s") or run_gb_s
        run_share = f"{roofline_ms * gb_s / case_gb_s / r['next_ms'] * 100:.0f}%" if roofline_ms and case_gb_s else "-"
        place = r.get("place_gb_s")
        place_share = f"{roofline_ms * gb_s / place / r['next_ms'] * 100:.0f}%" if roofline_ms and place else "-"
        read_mb = f"{r['bytes_read'] / 1e6:.1f}" if r["bytes_read"] else "-"
        compile_s = f"{r['compile_s']:.0f}" if r.get("compile_s") else "-"
        cores = f"{r['cores_share'] * 100:.0f}%" if r.get("cores_share") else "-"
        placement = "/".join(f"{ns:.0f}" if ns else "-" for ns in r.get("placement_ns") or [None])
        print(f"{r['backend']:<10}{r['scheme']:<7}{r['dtype']:<10}{r['next_ms']:>9.2f}{roofline:>12}{share:>14}"
              f"{run_share:>12}{place_share:>14}{read_mb:>14}{compile_s:>10}{cores:>8}{placement:>10}")


def straddles(row: dict) -> bool:
    """Whether the CPUs moved (llmbench.placement) between the round trips before and after a row's case."""
    ns = row.get("placement_ns") or [None]
    return moved(ns[0], ns[-1])


def ratio_lines(rows: list[dict]) -> list[str]:
    """Ours against llama.cpp and INT8 against 16 bits, each as a ratio of ms/token ("0.85x the time": faster), with
    where the CPUs sat for each (llmbench.placement): a hypervisor that moved them between two rows changed the
    machine, so the ratio is also given with each row's time scaled by its placement's best bandwidth."""
    done = [r for r in rows if "error" not in r]

    def best(backend_is_ours: bool, schemes: tuple[str, ...]) -> dict | None:
        found = [r for r in done if (r["backend"] != "llama.cpp") == backend_is_ours and r["scheme"] in schemes]
        return min(found, key=lambda r: r["next_ms"], default=None)

    ours16 = best(True, ("bf16", "fp16"))
    pairs = ((ours16, best(False, ("F16",))), (best(True, ("int4",)), best(False, ("Q4_1",))),
             (best(True, ("int8",)), ours16))
    lines = []
    for a, b in pairs:
        if a is None or b is None:
            continue
        line = (f"{a['backend']} {a['scheme']} {a['next_ms']:.2f} ms / {b['backend']} {b['scheme']} "
                f"{b['next_ms']:.2f} ms = {a['next_ms'] / b['next_ms']:.2f}x the time")
        a_ns, b_ns = ((r.get("placement_ns") or [None])[-1] for r in (a, b))
        straddled = [f"{r['backend']} {r['scheme']}" for r in (a, b) if straddles(r)]
        if straddled:
            line += (f" (the CPUs moved during {' and '.join(straddled)}: its time mixes two placements, rerun for a "
                     "ratio in one)")
        elif a_ns and b_ns and not any(moved(x, y) for x in a["placement_ns"] + b["placement_ns"]
                                     for y in a["placement_ns"] + b["placement_ns"]):
            line += f" (the CPUs placed alike for both: {a_ns:.0f} / {b_ns:.0f} ns)"
        elif a_ns and b_ns:
            line += f" (the CPUs placed otherwise for the two, {'/'.join(f'{n:.0f}' for n in a['placement_ns'])} " \
                    f"against {'/'.join(f'{n:.0f}' for n in b['placement_ns'])} ns"
            if a.get("place_gb_s") and b.get("place_gb_s"):
                line += (f"; at each placement's best bandwidth, {a['place_gb_s']:.1f} and {b['place_gb_s']:.1f} "
                         f"GB/s: {a['next_ms'] * a['place_gb_s'] / (b['next_ms'] * b['place_gb_s']):.2f}x")
            line += ")"
        lines.append(line)
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(p, schemes=",".join(SCHEMES), backends="")
    p.add_argument("--no-anchor", action="store_true", help="leave out the llama.cpp rows")
    args = p.parse_args()
    quiet_libraries(verbose=False, no_progress=True)
    device = resolve_device(args.device)
    print(f"CPU: {cpu_kind().describe()}; {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"allocator {loaded()[0]}", flush=True)
    def measure_now() -> dict:
        with cpu_lock(not args.no_lock and device.type == "cpu"):
            figures = device_bandwidth(device, refresh=True)
            if device.type == "cpu":
                figures["cores"] = measure_core_speed()
                figures["placement_ns"] = round_trip_ns()
            return figures

    bandwidth = measure_now()
    gb_s = bandwidth.get("read_bandwidth_gb_s")
    print(f"read bandwidth: {f'{gb_s:.1f} GB/s' if gb_s else 'unknown'} ({bandwidth.get('source')}: "
          f"{bandwidth.get('method') or bandwidth.get('error')})", flush=True)
    run_measures, cores = [bandwidth.get("last_measured_gb_s")], [bandwidth.get("cores")]
    placements = [bandwidth.get("placement_ns")]
    rows = []
    for backend in (args.backends or default_backends()).split(","):
        for scheme in args.schemes:
            print(f"[{scheme} {backend}] preparing ...", file=sys.stderr, flush=True)
            try:
                rows.append(run_one(scheme, backend, args))
            except Exception as exc:  # noqa: BLE001 - one failed case must not cost the others' figures
                traceback.print_exc(limit=-3, file=sys.stderr)
                rows.append({"backend": backend, "scheme": scheme, "error": f"{type(exc).__name__}: {exc}"})
    if not args.no_anchor and (args.model or device.type != "cpu"):
        print("llama.cpp rows left out: they run the default model on cpu", file=sys.stderr)
    elif not args.no_anchor:
        rows += anchor_rows(args)
    after = measure_now()
    run_measures.append(after.get("last_measured_gb_s"))
    cores.append(after.get("cores"))
    placements.append(after.get("placement_ns"))
    # each bandwidth check with where the CPUs sat when it ran
    seen = [m for m in run_measures + [r.get("run_gb_s") for r in rows] if m]
    if device.type == "cpu" and gb_s and seen and bandwidth.get("source") != OVERRIDE_ENV:
        for r in rows:  # each case's check for its placement's best and the host's (the best seen); the checks
            if r.get("run_gb_s"):  # before and after the cases were kept by measure_now
                note_cpu_reading(r["run_gb_s"], r.get("run_placement_ns"))
        if max(seen) > gb_s:  # a shared host's memory gives some moments far more than others
            print(f"read bandwidth: a check during this run read {max(seen):.1f} GB/s, more than the host's figure "
                  f"{gb_s:.1f}: the roofline uses {max(seen):.1f}")
            gb_s = max(seen)
        places = host_placements(cached_cpu_figure()[1])
        for r in rows:  # the best read where the CPUs sat during the case (none where they moved during it)
            if not straddles(r):
                r["place_gb_s"] = (placement_of(places, (r.get("placement_ns") or [None])[-1]) or {}).get(
                    "bandwidth_gb_s")
    run_gb_s = None
    if all(run_measures):
        run_gb_s = sum(run_measures) / len(run_measures)
        print(f"read bandwidth during this run: {run_measures[0]:.1f} GB/s before the cases, {run_measures[1]:.1f} "
              f"after (a shared host lowers it; the roofline uses the best seen, {gb_s:.1f})")
    if all(placements):
        host_ns = bandwidth.get("placement_round_trip_ns")
        print(f"CPU placement during this run: a cache line's round trip between two CPUs {placements[0]:.0f} ns "
              f"before the cases, {placements[1]:.0f} after (llmbench.placement; where the host's figure was read: "
              f"{f'{host_ns:.0f} ns' if host_ns else 'not recorded'})")
    best = host_best(cores[0]) if cores[0] else None
    if best and all(cores):
        print(f"cores during this run: {core_share(cores[0], best):.0%} of this host's best before the cases, "
              f"{core_share(cores[1], best):.0%} after (llmbench.core_speed; the best: a matrix product "
              f"{best['matmul_gflop_s']:.0f} GFLOP/s, a small operator {best['op_us']:.2f} us)")
    model = next((r["model"] for r in rows if "model" in r), args.model or "the default model")
    print(f"\nmodel {model}, batch 1, greedy, {args.input_tokens} input / {args.max_new_tokens} new "
          f"tokens, {args.num_iter} iterations; timed under {'no lock' if args.no_lock else LOCK}")
    print_table(rows, gb_s, run_gb_s)
    ratios = ratio_lines(rows)
    if ratios:
        print("\n" + "\n".join(ratios))
    llc = last_level_cache_bytes() if device.type == "cpu" else None
    fits = [f"{r['backend']} {r['scheme']}" for r in rows if llc and r.get("bytes_read") and r["bytes_read"] <= llc]
    if fits:
        print(f"\nthese rows read less per step than the CPU's {llc / 2**20:.0f} MiB last-level cache holds, so parts "
              f"may come from cache and beat the roofline drawn from memory bandwidth: {', '.join(fits)}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    from llmbench.allocator import restart_with_allocator

    restart_with_allocator()  # the allocator run_generation.py takes (llmbench/allocator.py)
    sys.exit(main())
