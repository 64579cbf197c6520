"""Weights the CPU decode kernels stream, moved into slabs of memory backed by transparent huge pages (2 MiB).

Each weight the kernels read is otherwise its own allocation of 4 KiB pages: a decode step walks the page tables
for every 4 KiB it streams. In slabs that the kernel is asked (madvise MADV_HUGEPAGE) to back with 2 MiB pages, a
step's linears streamed in 0.94-0.96x the time on a 2-core AMX Xeon (bf16 and INT4, the same tensors side by side
in one process). Where the kernel's THP setting is `never`, or madvise is unavailable, the slabs are plain memory.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
SLAB = 256 << 20  # bytes of address space per slab; pages never touched (its unused end) take no memory
ALIGN = 64  # each tensor starts on a cache line
MADV_HUGEPAGE = 14
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's transparent huge page setting (always, madvise, never), or why it is unknown."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return "unavailable (no transparent huge pages on this system)"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def _madvise_huge(address: int, length: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


class HugePageArena:
    """place(t) -> a copy of t inside a slab (contiguous, same dtype and shape). Slabs start on a 2 MiB boundary and
    are madvised before their first touch, so the page faults of the copies get huge pages."""

    def __init__(self, slab_bytes: int = SLAB):
        self.slab_bytes = slab_bytes
        self.slabs: list[torch.Tensor] = []
        self.advised = True
        self.placed_bytes = 0
        self._next = self._end = 0  # offsets in the newest slab: the next tensor's, the end of its advised part

    def _slab(self, nbytes: int) -> None:
        size = max(self.slab_bytes, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)
        buffer = torch.empty(size + HUGE_PAGE, dtype=torch.uint8)
        start = (-buffer.data_ptr()) % HUGE_PAGE
        self.advised &= _madvise_huge(buffer.data_ptr() + start, size)
        self.slabs.append(buffer)
        self._next, self._end = start, start + size

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        if self._end - self._next < nbytes:
            self._slab(nbytes)
        view = self.slabs[-1][self._next:self._next + nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        self._next += -(-nbytes // ALIGN) * ALIGN
        self.placed_bytes += nbytes
        return view

    def describe(self) -> str:
        mode = thp_mode()
        how = "madvised for huge pages" if self.advised and mode in ("always", "madvise") else \
            f"plain pages (transparent huge pages: {mode})"
        return f"{self.placed_bytes / 2**20:.1f} MiB in {len(self.slabs)} slab(s), {how}"


def weights_arena() -> HugePageArena | None:
    """The arena the compile backend moves the weights its kernels stream into; None for LLMBENCH_HUGE_PAGES=0,
    which keeps them where they are (for comparisons)."""
    return HugePageArena() if os.environ.get("LLMBENCH_HUGE_PAGES", "1") != "0" else None
