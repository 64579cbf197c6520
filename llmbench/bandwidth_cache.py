"""What a run's memory check adds to this host's cached cpu read bandwidth (llmbench.roofline).

The host's figure is the best read seen, with where its CPUs sat then (llmbench.placement); beside it the cache keeps
each placement the host has been seen in with the best read there. A hypervisor that places a guest's CPUs where
they reach less memory bandwidth makes another machine of it, not a disturbed one: a run there is judged against
what that placement has given, and its roofline is drawn at both figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from llmbench.placement import host_placements, placement_of
from llmbench.roofline import (
    CHECK_REPEATS,
    cache_file,
    cpu_read_method,
    host_threads,
    with_placement,
    write_json_atomically,
)


def cached_cpu_figure() -> tuple[Path, dict | None]:
    """This host's cache file of the cpu read bandwidth, and its entry where it holds one of the current method."""
    threads = host_threads()
    path = cache_file(torch.device("cpu"), threads)
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return path, None
    return path, cached if isinstance(cached, dict) and cached.get("method") == cpu_read_method(threads) else None


def note_cpu_reading(gb_s: float, placement_ns: float | None, keep: bool = True) -> dict:
    """A run's memory check (llmbench.roofline.check_cpu_read_bandwidth) read `gb_s` with the CPUs at round trip
    `placement_ns`. With `keep` (a quiet run: other work only ever lowers a reading) it is kept: above the host's
    figure it becomes the host's, with its placement (the best figure seen is the host's: a shared host's memory
    gives some moments far more than others); above the best its placement has read, that placement's; and a host
    figure cached without its placement may take this one (llmbench.roofline.with_placement).
    An unwritable cache keeps nothing. -> {"raised": whether the host's figure rose to `gb_s`, "placement_gb_s":
    the best this placement had read before (None: not seen before), "host_figure_ns": the host figure's placement
    now}."""
    path, cached = cached_cpu_figure()
    if cached is None:
        return {"raised": False, "placement_gb_s": None, "host_figure_ns": None}
    known = placement_of(host_placements(cached), placement_ns)
    new = dict(cached)
    raised = keep and gb_s > cached.get("bandwidth_gb_s", 0)
    if raised:
        check = cpu_read_method(host_threads(), repeats=CHECK_REPEATS)
        new.update(bandwidth_gb_s=gb_s, last_measured_gb_s=gb_s, raised_by=f"a run's memory check ({check})",
                   measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if keep:
        fields = with_placement(cached, gb_s, placement_ns)
        if fields["placement_round_trip_ns"] is None and "placement_round_trip_ns" not in cached:
            del fields["placement_round_trip_ns"]  # still unnamed: no empty field
        new.update(fields)
    if new != cached:
        try:
            write_json_atomically(path, new)
        except OSError:
            pass  # an unwritable cache: this run still uses the figures
    return {"raised": raised, "placement_gb_s": known["bandwidth_gb_s"] if known else None,
            "host_figure_ns": new.get("placement_round_trip_ns")}
