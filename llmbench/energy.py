"""Energy of the measured iterations, where the host exposes a counter: RAPL (Intel and AMD CPUs) through
/sys/class/powercap, NVML on NVIDIA GPUs, the GPU's hwmon energy counter on Intel GPUs (xpu). Otherwise null
with the reason; docs/validity.md says how to grant access."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmbench.gpu_watch import _nvml, _nvml_handle

POWERCAP = Path("/sys/class/powercap")
DRM = Path("/sys/class/drm")


@dataclass
class Energy:
    """Record key `energy`: joules over the measured iterations, per generated token, and mean power."""

    joules: float | None
    joules_per_token: float | None
    average_watts: float | None
    window_s: float | None
    generated_tokens: int | None  # over the measured iterations, batch included
    source: str | None  # e.g. "rapl:package-0", "nvml", "hwmon:card1"
    scope: str | None  # what the counter covers
    reason: str | None  # why it is null

    def to_record(self) -> dict:
        return asdict(self)


def unavailable(reason: str) -> Energy:
    return Energy(None, None, None, None, None, None, None, reason)


def is_virtual_machine() -> bool:
    try:
        return any(line.startswith("flags") and " hypervisor" in line
                   for line in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return False


class Counter:
    """One cumulative energy counter: read() -> joules so far; `wrap_j` is where it rolls over (None: never)."""

    def __init__(self, source: str, scope: str, read, wrap_j: float | None = None):
        self.source, self.scope, self.read, self.wrap_j = source, scope, read, wrap_j


def _read_uj(path: Path) -> float:
    return int(path.read_text()) / 1e6


def rapl_counters(powercap: Path = POWERCAP) -> tuple[list[Counter], str | None]:
    """The CPU packages' RAPL counters (top-level `package-N` zones), or the reason there are none."""
    zones = sorted(p for p in powercap.glob("intel-rapl:*") if p.name.count(":") == 1) if powercap.is_dir() else []
    packages = []
    for zone in zones:
        try:
            name = (zone / "name").read_text().strip()
        except OSError:
            continue
        if name.startswith("package"):
            packages.append((zone, name))
    if not packages:
        where = f"{powercap}/intel-rapl:*" if powercap.is_dir() else str(powercap)
        if is_virtual_machine():
            return [], f"no RAPL counter ({where} is absent): this is a virtual machine, whose hypervisor hides it"
        return [], f"no RAPL counter ({where} is absent): load the kernel's intel_rapl_msr module (root)"
    counters = []
    for zone, name in packages:
        energy = zone / "energy_uj"
        try:
            _read_uj(energy)
        except PermissionError:
            return [], (f"no permission to read {energy} (root only since Linux 5.10): "
                        f"run as root or `sudo chmod o+r {powercap}/intel-rapl:*/energy_uj`")
        except (OSError, ValueError) as exc:
            return [], f"cannot read {energy}: {exc}"
        try:
            wrap_j = _read_uj(zone / "max_energy_range_uj")
        except (OSError, ValueError):
            wrap_j = None
        counters.append(Counter(f"rapl:{name}", "CPU package (all processes on it)",
                                lambda e=energy: _read_uj(e), wrap_j))
    return counters, None


def nvml_counters(device) -> tuple[list[Counter], str | None]:

    nvml, reason = _nvml()
    if nvml is None:
        return [], reason
    try:
        handle = _nvml_handle(nvml, device)
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except nvml.NVMLError as exc:
        return [], f"NVML has no energy counter for {device}: {exc} (it needs a Volta or newer GPU)"
    return [Counter("nvml", "the whole GPU board",
                    lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3)], None


def intel_gpu_counters(drm: Path = DRM) -> tuple[list[Counter], str | None]:
    """The hwmon energy counter of an Intel GPU (i915/xe drivers of discrete GPUs); one GPU only."""
    found = []
    for card in sorted(drm.glob("card[0-9]*")) if drm.is_dir() else []:
        try:
            if (card / "device/vendor").read_text().strip() != "0x8086":
                continue
        except OSError:
            continue
        found += [(card.name, path) for path in sorted(card.glob("device/hwmon/hwmon*/energy1_input"))]
    if not found:
        return [], f"no Intel GPU energy counter ({drm}/card*/device/hwmon/hwmon*/energy1_input is absent)"
    if len(found) > 1:
        return [], "several Intel GPUs expose energy counters and which one is this xpu is unknown"
    card, path = found[0]
    try:
        _read_uj(path)
    except PermissionError:
        return [], f"no permission to read {path}: run as root or `sudo chmod o+r {path}`"
    except (OSError, ValueError) as exc:
        return [], f"cannot read {path}: {exc}"
    return [Counter(f"hwmon:{card}", "the whole GPU card", lambda: _read_uj(path))], None


def counters_for(device) -> tuple[list[Counter], str | None]:
    if device.type == "cpu":
        return rapl_counters()
    if device.type == "cuda":
        return nvml_counters(device)
    if device.type == "xpu":
        return intel_gpu_counters()
    return [], f"no energy counter is known for {device.type}"


class EnergyMeter:
    """Joules between start() and stop(tokens), summed over the device's counters."""

    def __init__(self, device, counters: tuple[list[Counter], str | None] | None = None):
        self.counters, self.reason = counters if counters is not None else counters_for(device)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._j0 = self._read()

    def _read(self) -> list[float] | None:
        try:
            return [c.read() for c in self.counters]
        except (OSError, ValueError) as exc:
            self.reason = f"the energy counter could not be read: {exc}"
            return None
        except Exception as exc:  # noqa: BLE001 - NVML raises its own error types
            self.reason = f"the energy counter could not be read: {type(exc).__name__}: {exc}"
            return None

    def stop(self, generated_tokens: int) -> Energy:
        window_s = time.perf_counter() - self._t0
        if not self.counters:
            return unavailable(self.reason or "no energy counter")
        after = self._read()
        if after is None or self._j0 is None:
            return unavailable(self.reason)
        joules = 0.0
        for counter, j0, j1 in zip(self.counters, self._j0, after):
            delta = j1 - j0
            if delta < 0 and counter.wrap_j:
                delta += counter.wrap_j  # rolled over once (RAPL package counters wrap every few minutes)
            joules += delta
        return Energy(joules=joules, joules_per_token=joules / generated_tokens if generated_tokens else None,
                      average_watts=joules / window_s if window_s > 0 else None, window_s=window_s,
                      generated_tokens=generated_tokens,
                      source="+".join(c.source for c in self.counters), scope=self.counters[0].scope, reason=None)
