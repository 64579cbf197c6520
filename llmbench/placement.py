"""Where a virtual machine's CPUs sit relative to each other now: how long a cache line takes between two of them.

A hypervisor may move a guest's virtual CPUs between physical cores while it runs. On a 2-vCPU AMD EPYC guest the
two sometimes shared a last-level cache (a round trip ~90-110 ns) and sometimes did not (~350-400 ns), switching
every few seconds to minutes; apart, two threads read memory up to ~1.8x as fast (each CCD its own link to memory),
and every hand-over between threads (a parallel region's fork and join: 0.6 -> 1.2 us) cost twice as much. So one
machine is two machines, and figures measured in one placement are not comparable with the other's. This module
measures the round trip (llmbench/placement.c, built once per host with the C compiler, ~0.1 s, into
LLMBENCH_CACHE/host) between the first CPU this process may use and up to 7 others; a record keeps the slowest pair
before and after its measured iterations and beside the host's bandwidth figure (llmbench.validity).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
from pathlib import Path

from llmbench.paths import cache_dir

SOURCE = Path(__file__).with_name("placement.c")
TRIPS, BATCHES, LIMIT_S = 500, 5, 0.5  # ~1-2 ms a pair on the machines measured
MAX_PAIRS = 7
MAX_PLACEMENTS = 8  # per host cache: the placements seen, each with the best bandwidth read there
MOVED_RATIO = 1.8  # round trips this far apart: another placement (measured ones: 2.7-4.5x apart, within 1.4x)
METHOD = (f"round trip of a cache line between two pinned threads, best of {BATCHES} x {TRIPS}, the first allowed "
          f"CPU against up to {MAX_PAIRS} others; the slowest pair")

_library: ctypes.CDLL | str | None = None


def _load() -> ctypes.CDLL | str:
    """The built library, or why there is none (one line)."""
    global _library
    if _library is not None:
        return _library
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        _library = "no C compiler (cc or gcc, or CC) to build llmbench/placement.c"
        return _library
    digest = hashlib.sha256(SOURCE.read_bytes() + compiler.encode()).hexdigest()[:12]
    target = cache_dir() / "host" / f"placement-{digest}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.with_suffix(f".tmp{os.getpid()}.so")
            done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o", str(staging)],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                _library = f"building llmbench/placement.c failed: {last}"
                return _library
            os.replace(staging, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        _library = f"llmbench/placement.c: {type(exc).__name__}: {exc}"
        return _library
    library.round_trip_ns.restype = ctypes.c_double
    library.round_trip_ns.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_int, ctypes.c_double]
    _library = library
    return _library


def allowed_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def measure_placement(cpus: list[int] | None = None) -> dict:
    """-> {"round_trip_ns": the slowest pair's, "pairs": [[cpu, cpu, ns], ...], "method"}, or {"error": why}.
    Never raises: a run's figures matter more than this check."""
    cpus = allowed_cpus() if cpus is None else sorted(set(cpus))
    if len(cpus) < 2:
        return {"error": f"this process may use {len(cpus)} CPU: no pair to measure"}
    library = _load()
    if isinstance(library, str):
        return {"error": library}
    others = cpus[1:]
    if len(others) > MAX_PAIRS:  # spread over the list: neighbours often share a core or a cache
        others = [others[round(i * (len(others) - 1) / (MAX_PAIRS - 1))] for i in range(MAX_PAIRS)]
    pairs = []
    for other in others:
        ns = library.round_trip_ns(cpus[0], other, TRIPS, BATCHES, LIMIT_S)
        if ns < 0:
            return {"error": f"no round trip between CPUs {cpus[0]} and {other} within {LIMIT_S} s (one of them busy "
                             "with other work, or not allowed)"}
        pairs.append([cpus[0], other, round(ns, 1)])
    return {"round_trip_ns": max(p[2] for p in pairs), "pairs": pairs, "method": METHOD}


def round_trip_ns() -> float | None:
    """measure_placement's slowest round trip now, or None where it could not be measured."""
    return measure_placement().get("round_trip_ns")


def moved(a_ns: float | None, b_ns: float | None) -> bool:
    """Whether two round trips (measure_placement's) come from different placements of the CPUs."""
    return bool(a_ns and b_ns) and max(a_ns, b_ns) / min(a_ns, b_ns) > MOVED_RATIO


def placement_key(seen: list, ns: float | None) -> float | None:
    """The round trip that stands for `ns`'s placement among `seen` (the first not moved from it; benchmarks group
    their rounds by it), appended to `seen` where none is."""
    for known in seen:
        if not moved(known, ns):
            return known
    seen.append(ns)
    return ns


class PlacedRound:
    """A benchmark's round between two round trips: `with PlacedRound(seen) as where: ...`; then `where.moved` says
    whether the CPUs moved during it (such rounds are left out of figures per placement), else `where.key` is its
    placement (placement_key among `seen`, which grows; None where round trips cannot be measured)."""

    def __init__(self, seen: list):
        self.seen, self.key, self.moved = seen, None, False

    def __enter__(self) -> PlacedRound:
        self.before = round_trip_ns()
        return self

    def __exit__(self, *exc) -> None:
        after = round_trip_ns()
        self.moved = moved(self.before, after)
        self.key = None if self.moved else placement_key(self.seen, after)


def placement_of(placements: list[dict], ns: float | None) -> dict | None:
    """The entry of `placements` ({"round_trip_ns", "bandwidth_gb_s"}: the placements a host has been seen in, each
    with the best memory read there) for CPUs whose round trip is `ns`: the nearest not moved from it, else None."""
    near = [p for p in placements if ns and p.get("round_trip_ns") and not moved(ns, p["round_trip_ns"])]
    return min(near, key=lambda p: abs(math.log(ns / p["round_trip_ns"])), default=None)


def with_reading(placements: list[dict], gb_s: float, ns: float | None) -> list[dict] | None:
    """`placements` after a quiet read of memory at `gb_s` with the CPUs at round trip `ns`: its placement's best
    raised, or the placement added. -> the new list, or None where nothing changed (no `ns`, or not higher)."""
    if not ns or not gb_s > 0:
        return None
    entry = placement_of(placements, ns)
    if entry is not None and gb_s <= entry.get("bandwidth_gb_s", 0):
        return None
    if entry is None:
        return (placements + [{"round_trip_ns": ns, "bandwidth_gb_s": gb_s}])[-MAX_PLACEMENTS:]
    return [{**p, "bandwidth_gb_s": gb_s} if p is entry else p for p in placements]


def host_placements(cached: dict | None) -> list[dict]:
    """The placements a host's cached bandwidth figure (llmbench.roofline) has seen, each with its best read; the
    host's figure counts for its own placement where it names one (figures cached before placements were kept)."""
    placements = list(cached.get("placements") or []) if cached else []
    ns = cached.get("placement_round_trip_ns") if cached else None
    return with_reading(placements, cached.get("bandwidth_gb_s", 0), ns) or placements if ns else placements


if __name__ == "__main__":
    import json

    print(json.dumps(measure_placement()))
