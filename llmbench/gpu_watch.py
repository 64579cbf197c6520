"""What an NVIDIA GPU did while the measured iterations ran, through NVML: clocks and the reasons they were lowered,
thermal throttling, and the other processes on the device (their memory and SM share). llmbench.validity judges it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil

GPU_CLOCK_REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap",
                     0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
                     0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}
GPU_SLOWDOWN_REASONS = {"hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"}


def clock_reason_names(mask: int) -> list[str]:
    return [name for bit, name in GPU_CLOCK_REASONS.items() if mask & bit]


@dataclass
class GpuFigures:
    """An NVIDIA GPU's state at the start and end of the measured iterations (NVML)."""

    name: str | None = None
    sm_clock_mhz_before: int | None = None
    sm_clock_mhz_after: int | None = None
    sm_clock_mhz_max: int | None = None
    clock_reasons_before: list[str] = field(default_factory=list)
    clock_reasons_after: list[str] = field(default_factory=list)
    thermal_throttle_share: float | None = None  # share of the window clocked down for heat (NVML violation time)
    power_throttle_share: float | None = None
    temperature_c_after: int | None = None
    own_pid_visible: bool | None = None  # False: NVML reports another PID namespace's ids (a container)
    other_processes: list[dict] = field(default_factory=list)  # pid, name, used memory, mean SM %
    other_sm_percent: float | None = None
    unreadable: str | None = None


def _nvml():
    try:
        import pynvml
    except ImportError:
        return None, "pynvml is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, f"NVML could not start: {exc}"
    return pynvml, None


def _nvml_handle(nvml, device):
    """NVML's handle of a CUDA device: NVML numbers all GPUs, CUDA only those in CUDA_VISIBLE_DEVICES."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return nvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(index))  # what clock_rate() uses
    except (AttributeError, RuntimeError, ValueError, nvml.NVMLError):
        pass
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except nvml.NVMLError:
            pass
    return nvml.nvmlDeviceGetHandleByIndex(index)


class GpuWatch:
    """NVML figures of one CUDA device between start() and stop(); `own_pids` are this job's processes."""

    def __init__(self, device, own_pids: list[int]):
        self.device, self.own_pids = device, set(own_pids)
        self.nvml, self.unreadable = _nvml()
        self.handle = None
        if self.nvml is not None:
            try:
                self.handle = _nvml_handle(self.nvml, device)
            except self.nvml.NVMLError as exc:
                self.unreadable = f"NVML has no handle for {device}: {exc}"

    def _call(self, fn, *args, default=None):
        try:
            return fn(self.handle, *args)
        except self.nvml.NVMLError:
            return default

    def _reasons(self) -> list[str]:
        get = getattr(self.nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            self.nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        mask = self._call(get)
        return clock_reason_names(mask) if mask is not None else []

    def _violation_ns(self, policy: int) -> int | None:
        status = self._call(self.nvml.nvmlDeviceGetViolationStatus, policy)
        return getattr(status, "violationTime", None)

    def start(self) -> None:
        if self.handle is None:
            return
        nv = self.nvml
        self._t0 = time.perf_counter()
        self._t0_us = int(time.time() * 1e6)
        self._clock0 = self._call(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_SM)
        self._reasons0 = self._reasons()
        self._thermal0 = self._violation_ns(nv.NVML_PERF_POLICY_THERMAL)
        self._power0 = self._violation_ns(nv.NVML_PERF_POLICY_POWER)

    def stop(self) -> GpuFigures:
        if self.handle is None:
            return GpuFigures(unreadable=self.unreadable)
        nv = self.nvml
        window_ns = (time.perf_counter() - self._t0) * 1e9
        name = self._call(nv.nvmlDeviceGetName)
        figures = GpuFigures(
            name=name.decode() if isinstance(name, bytes) else name,
            sm_clock_mhz_before=self._clock0,
            sm_clock_mhz_after=self._call(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_SM),
            sm_clock_mhz_max=self._call(nv.nvmlDeviceGetMaxClockInfo, nv.NVML_CLOCK_SM),
            clock_reasons_before=self._reasons0, clock_reasons_after=self._reasons(),
            temperature_c_after=self._call(nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU))
        for attr, policy, before in (("thermal_throttle_share", nv.NVML_PERF_POLICY_THERMAL, self._thermal0),
                                     ("power_throttle_share", nv.NVML_PERF_POLICY_POWER, self._power0)):
            after = self._violation_ns(policy)
            if before is not None and after is not None and window_ns > 0:
                setattr(figures, attr, (after - before) / window_ns)
        procs = self._call(nv.nvmlDeviceGetComputeRunningProcesses, default=[]) or []
        samples: dict[int, list[int]] = {}  # pid -> its SM % samples since the start
        for sample in self._call(nv.nvmlDeviceGetProcessUtilization, self._t0_us, default=[]) or []:
            samples.setdefault(sample.pid, []).append(sample.smUtil)
        utilization = {pid: sum(v) / len(v) for pid, v in samples.items()}
        pids = {p.pid for p in procs} | set(utilization)
        figures.own_pid_visible = bool(pids & self.own_pids)
        for p in procs:
            if p.pid in self.own_pids:
                continue
            try:
                name = psutil.Process(p.pid).name()
            except psutil.Error:
                name = None
            figures.other_processes.append({"pid": p.pid, "name": name, "used_memory_bytes": p.usedGpuMemory,
                                            "sm_percent": utilization.get(p.pid)})
        if utilization:
            figures.other_sm_percent = float(sum(v for pid, v in utilization.items() if pid not in self.own_pids))
        return figures
