"""The memory-bandwidth roofline of a decode step: the bytes one step must read over the device's read bandwidth.

A decode step at small batch is memory-bound, so its latency cannot beat (weights it reads + the KV cache it reads)
/ bandwidth. On cpu the bandwidth is measured once per host (a subprocess, so the 1 GiB buffer never shows in the
run's peak RSS) and cached; on GPUs it is the datasheet figure of known devices, with a measured device copy beside
it. LLMBENCH_READ_BANDWIDTH_GB_S overrides both.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmbench.devices import device_name, synchronize
from llmbench.errors import UserError
from llmbench.host import cpu_kind
from llmbench.models import _tensor_bytes, weight_bytes
from llmbench.paths import PROJECT_ROOT, cache_dir
from llmbench.placement import host_placements, moved, round_trip_ns, with_reading

OVERRIDE_ENV = "LLMBENCH_READ_BANDWIDTH_GB_S"
CPU_READ_BYTES = 1 << 30
GPU_COPY_BYTES = 2 << 30  # per buffer: 4 GiB in all, beside a loaded model
REPEATS = 10  # best of: a momentary disturbance (another process, a page fault) does not stick
CHECK_REPEATS = 3  # the check after a run's measured iterations (~0.5 s on a 2-core host)
BUSY_LIMIT = 0.25  # share of the CPUs busy with other work above which a measurement is used but never cached
SAME_PLACEMENT_SHARE = 0.8  # a reading this close to the host's figure is taken to come from its CPUs' placement
# Datasheet memory bandwidth, bytes/s, by a fragment of the device name; the first fragment found wins, so more
# specific names come first ("H100 PCIe" before "H100").
DATASHEET_BANDWIDTH_B_S = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB
    ("L40S", 0.864e12),
    ("GPU Max 1550", 3.2768e12),  # Intel Data Center GPU Max 1550
    ("GPU Max 1100", 1.2288e12),
)


def datasheet_bandwidth(device_name: str) -> float | None:
    return next((bw for fragment, bw in DATASHEET_BANDWIDTH_B_S if fragment in device_name), None)


def cpu_read_method(threads: int, size_bytes: int = CPU_READ_BYTES, repeats: int = REPEATS) -> str:
    return f"sum of a {size_bytes / 2**30:g} GiB float32 tensor, {threads} threads, best of {repeats}"


def gpu_copy_method(size_bytes: int = GPU_COPY_BYTES, repeats: int = REPEATS) -> str:
    return f"device-to-device copy of {size_bytes / 2**30:g} GiB, read + written bytes, best of {repeats}"


def measure_cpu_read_bandwidth(size_bytes: int = CPU_READ_BYTES, repeats: int = REPEATS) -> float:
    """Bytes/s a full-tensor sum streams from memory with torch's threads (best of `repeats`)."""
    return measure_cpu_read(size_bytes, repeats)[0]


def measure_cpu_read(size_bytes: int = CPU_READ_BYTES, repeats: int = REPEATS) -> tuple[float, float | None]:
    """measure_cpu_read_bandwidth, and where the CPUs sat for its best sum (llmbench.placement: the round trip
    before and after it, outside the timing; None where they moved during it or it could not be measured)."""
    data = torch.ones(size_bytes // 4, dtype=torch.float32)
    data.sum()
    best, where = float("inf"), None
    for _ in range(repeats):
        before = round_trip_ns()
        start = time.perf_counter()
        data.sum()
        took = time.perf_counter() - start
        after = round_trip_ns()
        if took < best:
            best, where = took, None if moved(before, after) else after
    return size_bytes / best, where


def host_threads() -> int:
    """Threads of the host's read-bandwidth figure: every CPU of the host, whatever this process's own thread count
    (the roofline is the machine's, and the ranks of a distributed run, fewer threads each, look up the same figure)."""
    return os.cpu_count() or torch.get_num_threads()


def check_cpu_read_bandwidth(repeats: int = CHECK_REPEATS) -> dict:
    """The read bandwidth available now, measured in this process as the host's figure is (a 1 GiB sum, one thread
    per CPU), best of `repeats`: after a run's measured iterations it tells whether something else took the memory
    bandwidth the run needed, which no CPU counter of this machine shows when the other work runs in another
    virtual machine. -> {"read_bandwidth_gb_s", "method", "placement_ns": where the CPUs sat for the best read
    (measure_cpu_read)}."""
    threads, before = host_threads(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bytes_s, where = measure_cpu_read(repeats=repeats)
    finally:
        torch.set_num_threads(before)
    return {"read_bandwidth_gb_s": bytes_s / 1e9, "method": cpu_read_method(threads, repeats=repeats),
            "placement_ns": where}


def measure_copy_bandwidth(device: torch.device, size_bytes: int = GPU_COPY_BYTES, repeats: int = REPEATS) -> float:
    """Bytes moved per second by a device-to-device copy, reads and writes both counted (a copy moves as many bytes as
    it reads, so this is what a read-only stream can reach at best)."""
    src = torch.empty(size_bytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best


def cache_file(device: torch.device, threads: int) -> Path:
    """$LLMBENCH_CACHE/host/<hostname>-<device kind>-<hash>.json: the hash covers what the figure depends on (the
    CPU's model and flags and the thread count, or the GPU's name), so another machine or setting measures anew."""
    if device.type == "cpu":
        identity = f"{cpu_kind().identity}|{threads}"
    else:
        identity = device_name(device)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return cache_dir() / "host" / f"{socket.gethostname()}-{device.type}-{digest}.json"


def cpu_busy_share(window_s: float = 0.5) -> float | None:
    """Share of all CPUs busy (not idle or waiting on I/O) over `window_s`, from /proc/stat; None where unreadable."""
    def sample() -> list[int]:
        with open("/proc/stat", encoding="utf-8") as f:
            return [int(v) for v in f.readline().split()[1:9]]
    try:
        before = sample()
        time.sleep(window_s)
        after = sample()
    except (OSError, ValueError):
        return None
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta)
    return (total - delta[3] - delta[4]) / total if total > 0 else None


def measure_in_subprocess(device: torch.device, threads: int) -> dict:
    """-> {"bandwidth_gb_s", "method"} measured by a child process (its buffers stay out of this run's memory)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                                     os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "llmbench.roofline", str(device), str(threads)], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"bandwidth measurement failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measured_bandwidth(device: torch.device, refresh: bool = False, measure: bool = True) -> dict:
    """The device's measured bandwidth: from this host's cache, else measured now and cached, unless other work kept
    more than BUSY_LIMIT of the CPUs busy just before (then it serves this run only). `refresh` measures anew (e.g.
    under a lock on a quiet machine) and keeps the higher of the new and the cached figure: a busy moment only lowers
    a bandwidth, so the best figure seen is the host's. Without `measure`: the cache, or a RuntimeError.
    -> {"bandwidth_gb_s", "method", "measured_at", "source", "cache_file"}."""
    threads = host_threads()
    method = cpu_read_method(threads) if device.type == "cpu" else gpu_copy_method()
    path = cache_file(device, threads)
    cached = None
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("method") != method or not cached.get("bandwidth_gb_s", 0) > 0:
            cached = None
    except (OSError, ValueError, AttributeError):
        pass  # absent or unreadable: measure again
    if cached is not None and not refresh:
        return {**cached, "source": "cache", "cache_file": str(path)}
    if not measure:
        raise RuntimeError(f"no cached bandwidth measurement ({path}): run a single-process benchmark once")
    busy = cpu_busy_share() if device.type == "cpu" else None  # this process is idle now: the rest is others' work
    child = measure_in_subprocess(device, threads)
    now = child["bandwidth_gb_s"]
    entry = {"bandwidth_gb_s": max(now, cached["bandwidth_gb_s"] if cached else 0), "last_measured_gb_s": now,
             "method": method, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "cpu_busy_before": busy}
    if device.type == "cpu":
        entry.update(with_placement(cached, now, child.get("placement_ns"), keep=(busy or 0) <= BUSY_LIMIT))
    if busy is not None and busy > BUSY_LIMIT and cached is None:
        # Kept for this run only: cached, a figure lowered by other work would stand for every later run.
        return {**entry, "source": "measured", "not_cached": f"{busy:.0%} of the CPUs were busy with other work"}
    write_json_atomically(path, entry)
    return {**entry, "source": "measured", "cache_file": str(path)}


def with_placement(cached: dict | None, gb_s: float, ns: float | None, keep: bool = True) -> dict:
    """The placement fields of this host's cpu figure (`cached`) after a read of `gb_s` with the CPUs at round trip
    `ns` (llmbench.placement): "placement_round_trip_ns", where they sat for the best figure (this read's where it is
    higher, or where the figure names none and this read is at least SAME_PLACEMENT_SHARE of it: the other placement
    read 0.43-0.57x on the host measured), and "placements", each placement's best read (this one counted with
    `keep`: other work only lowers a read)."""
    best = cached.get("bandwidth_gb_s", 0) if cached else 0
    known = cached.get("placement_round_trip_ns") if cached else None
    placement = ns if gb_s > best or (not known and gb_s >= SAME_PLACEMENT_SHARE * best) else known
    # the placements seen, the old figure's and the new one's each counted for its own
    seen = host_placements({"placements": host_placements(cached), "bandwidth_gb_s": max(best, gb_s),
                            "placement_round_trip_ns": placement})
    seen = (with_reading(seen, gb_s, ns) if keep else None) or seen
    return {"placement_round_trip_ns": placement, "placements": seen}


def with_bandwidth(roofline_info: dict, gb_s: float) -> dict:
    """A cpu record's roofline (one process) recomputed with the host's new read bandwidth `gb_s`."""
    read = roofline_info.get("bytes_read_per_token")
    return {**roofline_info, "read_bandwidth_gb_s": gb_s, "raised_after_measurement_from_gb_s":
            roofline_info.get("read_bandwidth_gb_s"), "roofline_next_token_s": read / (gb_s * 1e9) if read else None}


def write_json_atomically(path: Path, data: dict) -> None:
    """A host figure's cache file, written whole or not at all: concurrent runs never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".tmp{os.getpid()}")
    staging.write_text(json.dumps(data) + "\n", encoding="utf-8")
    os.replace(staging, path)


def override_bandwidth() -> float | None:
    text = os.environ.get(OVERRIDE_ENV)
    if text is None or not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise UserError(f"{OVERRIDE_ENV}={text!r}: expected a positive number of GB/s, e.g. 25.1")
    return value


def device_bandwidth(device: torch.device, measure: bool = True, refresh: bool = False) -> dict:
    """The bandwidth the roofline divides by, and where it came from. -> {"read_bandwidth_gb_s", "source",
    "method", ...}; on GPUs also "datasheet_bandwidth_gb_s" and "measured_bandwidth_gb_s". Never raises for a failed
    measurement (the run's figures matter more): read_bandwidth_gb_s is then None and "error" says why. Without
    `measure`, only a cached measurement is used; with `refresh`, it is measured anew (see measured_bandwidth)."""
    override = override_bandwidth()
    if override is not None:
        return {"read_bandwidth_gb_s": override, "source": OVERRIDE_ENV, "method": "set by the user"}
    info: dict = {}
    if device.type != "cpu":
        datasheet = datasheet_bandwidth(device_name(device))
        info["datasheet_bandwidth_gb_s"] = datasheet / 1e9 if datasheet else None
    try:
        measured = measured_bandwidth(device, refresh=refresh, measure=measure)
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
        info.update(read_bandwidth_gb_s=info.get("datasheet_bandwidth_gb_s"), error=str(exc),
                    source="datasheet" if info.get("datasheet_bandwidth_gb_s") else None)
        return info
    if device.type == "cpu":
        return {"read_bandwidth_gb_s": measured.pop("bandwidth_gb_s"), **measured}
    info["measured_bandwidth_gb_s"] = measured["bandwidth_gb_s"]
    info["measured"] = measured
    if info["datasheet_bandwidth_gb_s"]:
        return {"read_bandwidth_gb_s": info["datasheet_bandwidth_gb_s"], "source": "datasheet",
                "method": "datasheet peak of the device", **info}
    return {"read_bandwidth_gb_s": measured["bandwidth_gb_s"], "source": measured["source"],
            "method": measured["method"], **info}


def weight_bytes_read_per_token(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter (each shared tensor once) except an input embedding table
    that is not also the output head (a step reads one row of it). Mixture-of-experts models count every expert,
    although a step at batch 1 reads only the routed ones."""
    total = weight_bytes(model)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight is not embedding:
        total -= _tensor_bytes(embedding)
    return total


def head_size(config) -> int:
    """Values per attention head of a model's (text) config: its head_dim, else hidden size over heads; 0 where
    neither is known."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None)
    return getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads if heads else 0)


def kv_cache_bytes_per_position(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one cached position holds, over all layers, for one sequence."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv_heads = 1  # falcon, gpt_bigcode
    else:
        kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_size(config) * torch.tensor([], dtype=dtype).element_size()


def decode_bytes_read(model: torch.nn.Module, dtype: torch.dtype, rows: int, input_tokens: int,
                      max_new_tokens: int, world_size: int = 1) -> dict:
    """Bytes one decode step reads: weights + the KV cache of `rows` sequences (batch x beams) at the mean decode
    position. Next-token step j (1 .. n-1) attends over input + j positions, so the mean is input + n / 2. With
    several ranks `model` is one rank's shard: its weight bytes are counted once per rank."""
    mean_context_tokens = input_tokens + max_new_tokens / 2
    weights = weight_bytes_read_per_token(model) * world_size
    kv = int(kv_cache_bytes_per_position(model.config, dtype) * rows * mean_context_tokens)
    return {"bytes_read_per_token": weights + kv, "weight_bytes_read_per_token": weights,
            "kv_cache_bytes_read_per_token": kv, "mean_context_tokens": mean_context_tokens}


def roofline(model: torch.nn.Module, dtype: torch.dtype, rows: int, input_tokens: int, max_new_tokens: int,
             bandwidth: dict, devices: int = 1, world_size: int = 1, cache_bytes: int | None = None) -> dict:
    """The record's "roofline": bytes read per step, the bandwidth used and its source, and roofline_next_token_s.
    `devices` is how many devices' bandwidth the step has (GPU ranks each bring their own; cpu ranks share one).
    `cache_bytes` (cpu: the last-level cache's size) adds whether a step's bytes fit in it: then parts of them may
    come from that cache, and a step may beat a roofline drawn from memory bandwidth."""
    out = {**decode_bytes_read(model, dtype, rows, input_tokens, max_new_tokens, world_size), **bandwidth}
    gb_s = bandwidth.get("read_bandwidth_gb_s")
    out["roofline_next_token_s"] = out["bytes_read_per_token"] / (gb_s * 1e9 * devices) if gb_s else None
    if cache_bytes:
        out["last_level_cache_bytes"] = cache_bytes
        out["fits_in_last_level_cache"] = out["bytes_read_per_token"] <= cache_bytes
    return out


def roofline_metrics(roofline_info: dict | None, next_token_latency_s: float | None) -> dict:
    """-> {"roofline_next_token_s", "roofline_fraction", "roofline_fraction_at_run_bandwidth"} for the record's
    metrics (fraction: roofline / measured mean next-token latency; 1.0 would be a step at the bandwidth limit). The
    last draws the roofline at the bandwidth this run's memory check read right after the measured iterations
    (`run_read_bandwidth_gb_s`, cpu): how close the steps came to what the memory gave during the run, where a
    shared host gave less than its best (None without a check). Where the CPUs sat where this host reads less at
    best than its figure (`placement_read_bandwidth_gb_s`, llmbench.placement), "roofline_fraction_at_placement_
    bandwidth" draws it at that best."""
    info = roofline_info or {}
    roofline_s = info.get("roofline_next_token_s")
    fraction = roofline_s / next_token_latency_s if roofline_s and next_token_latency_s else None
    host, run = info.get("read_bandwidth_gb_s"), info.get("run_read_bandwidth_gb_s")
    place = info.get("placement_read_bandwidth_gb_s")
    out = {"roofline_next_token_s": roofline_s, "roofline_fraction": fraction,
           "roofline_fraction_at_run_bandwidth": fraction * host / run if fraction and host and run else None}
    if place:
        out["roofline_fraction_at_placement_bandwidth"] = fraction * host / place if fraction and host else None
    return out


def roofline_line(metrics: dict, roofline_info: dict | None) -> str | None:
    """The console line printed after "Weight read bandwidth": '% of roofline' and what the roofline is."""
    if not roofline_info or metrics.get("roofline_next_token_s") is None:
        return None
    line = (f"Roofline: {metrics['roofline_next_token_s'] * 1e3:.3f} ms per next token "
            f"({roofline_info['bytes_read_per_token'] / 1e6:.1f} MB read at {roofline_info['read_bandwidth_gb_s']:.1f}"
            f" GB/s, {roofline_info['source']}{raised_note(roofline_info)})")
    if metrics.get("roofline_fraction") is not None:
        line += f"; {metrics['roofline_fraction'] * 100:.0f}% of roofline"
    if metrics.get("roofline_fraction_at_run_bandwidth") is not None:
        line += (f" ({metrics['roofline_fraction_at_run_bandwidth'] * 100:.0f}% at the "
                 f"{roofline_info['run_read_bandwidth_gb_s']:.1f} GB/s this run's memory check read)")
    if metrics.get("roofline_fraction_at_placement_bandwidth") is not None:
        line += (f"; {metrics['roofline_fraction_at_placement_bandwidth'] * 100:.0f}% at the "
                 f"{roofline_info['placement_read_bandwidth_gb_s']:.1f} GB/s this host reads at best with its CPUs "
                 "placed as in this run")
    return line + (cache_note(roofline_info) or "")


def raised_note(roofline_info: dict) -> str:
    before = roofline_info.get("raised_after_measurement_from_gb_s")
    return f", raised from {before:.1f} by this run's memory check" if before else ""


def cache_note(roofline_info: dict) -> str | None:
    """A warning, where a step's bytes fit in the CPU's last-level cache, that the roofline drawn from memory
    bandwidth is not the limit there (a larger model of the same family shows the memory-bound figure)."""
    if not roofline_info.get("fits_in_last_level_cache"):
        return None
    return (f"; the {roofline_info['bytes_read_per_token'] / 1e6:.1f} MB a step reads fit in this CPU's "
            f"{roofline_info['last_level_cache_bytes'] / 2**20:.0f} MiB last-level cache, so parts may come from "
            "cache, faster than this roofline")


def _main(argv: list[str]) -> int:
    """python -m llmbench.roofline DEVICE THREADS: measure and print {"bandwidth_gb_s", "placement_ns"} as JSON."""
    device, threads = torch.device(argv[0]), int(argv[1])
    torch.set_num_threads(threads)
    bandwidth, where = measure_cpu_read() if device.type == "cpu" else (measure_copy_bandwidth(device), None)
    print(json.dumps({"bandwidth_gb_s": bandwidth / 1e9, "placement_ns": where}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
