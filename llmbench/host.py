"""What kind of CPU this is: model name, the instruction-set flags that decide which kernels are fast, a short label.

Read from /proc/cpuinfo (Linux), never assumed: the machines the suite runs on differ (AMX Xeon, AVX-512 EPYC with
native bf16, AVX2-only EPYC), and the right precision and kernels differ with them.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CPUINFO = "/proc/cpuinfo"
CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
# The flags that change which precision runs natively and which kernels libraries pick.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_fp16",
                  "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 dot products in hardware
FP16_FLAGS = ("avx512_fp16", "amx_fp16")  # fp16 arithmetic in hardware (f16c only converts)


@dataclass(frozen=True)
class CpuKind:
    model_name: str
    flags: frozenset[str]  # every flag /proc/cpuinfo lists (empty where it cannot be read)
    generation: str = ""  # x86 'family F model M' (a guest's model name may say only 'AMD EPYC'), else ""

    @property
    def relevant_flags(self) -> list[str]:
        return [f for f in RELEVANT_FLAGS if f in self.flags]

    @property
    def amd(self) -> bool:
        """The vendor the kernels' per-CPU choices are made by (AMD: what the EPYCs measured; others: the AMX Xeon)."""
        return "AMD" in self.model_name.upper()

    @property
    def native_bf16(self) -> bool:
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def native_fp16(self) -> bool:
        return any(f in self.flags for f in FP16_FLAGS)

    @property
    def kind(self) -> str:
        """A short label to choose code paths by and to print beside figures: AMX, AVX-512 + bf16, AVX-512, AVX2."""
        if "amx_bf16" in self.flags or "amx_int8" in self.flags:
            return "AMX + fp16" if "amx_fp16" in self.flags else "AMX"
        if "avx512f" in self.flags:
            extras = [name for name, flag in (("bf16", "avx512_bf16"), ("fp16", "avx512_fp16")) if flag in self.flags]
            return " + ".join(["AVX-512", *extras])
        if "avx2" in self.flags:
            return "AVX2"
        return "baseline" if self.flags else "unknown"

    @property
    def identity(self) -> str:
        """'<model name>|<every flag, sorted>': what caches of figures and compiled code are kept apart by."""
        return f"{self.model_name}|{' '.join(sorted(self.flags))}"

    def describe(self) -> str:
        """One line for consoles and tables: 'AMD EPYC family 25 model 1 (AVX2: avx2 fma)'."""
        name = f"{self.model_name} {self.generation}".rstrip()
        return f"{name} ({self.kind}: {' '.join(self.relevant_flags) or 'no listed flags'})"

    def to_record(self) -> dict:
        return {"model_name": self.model_name, "generation": self.generation, "kind": self.kind,
                "flags": self.relevant_flags}


def parse_cpuinfo(text: str) -> CpuKind:
    """The first processor's model name, family and model numbers and flags from /proc/cpuinfo text (all cores of a
    host share them)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() and fields:
            break  # the end of the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    family, model = fields.get("cpu family", ""), fields.get("model", "")
    generation = f"family {family} model {model}" if family.isdigit() and model.isdigit() else ""
    return CpuKind(fields.get("model name") or platform.processor() or platform.machine(),
                   frozenset(fields.get("flags", "").split()), generation)


@cache
def cpu_kind() -> CpuKind:
    """This host's CPU, read once per process."""
    try:
        with open(CPUINFO, encoding="utf-8") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return parse_cpuinfo("")


def parse_cache_size(text: str) -> int:
    """sysfs's cache size ('491520K', '2048K', '32M') -> bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


@cache
def last_level_cache_bytes() -> int | None:
    """The size of the CPU's largest data cache level (sysfs: cpu0's highest-level data or unified cache; a guest
    sees what its hypervisor reports, shared with other tenants), or None where it cannot be read."""
    best: tuple[int, int] | None = None
    for index in CACHES.glob("index*"):
        try:
            level = int((index / "level").read_text())
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = parse_cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, size)
    return best[1] if best else None
