"""Building the CPU decode kernels (cpu_kernels.py) and any second build of them (benchmarks/kernel_builds.py):
compiled once per host, flags and source text into `$LLMBENCH_CACHE/kernels/`, loaded as torch ops."""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import time
from pathlib import Path

import torch

from llmbench.errors import one_line
from llmbench.host import cpu_kind
from llmbench.paths import cache_dir

STALE_LOCK_S = 15 * 60  # a build takes about a minute on 2 cores: a lock this old was left by a killed one


def build_dir() -> Path:
    return cache_dir() / "kernels"


def build(stem: str, sources: list[Path], extra: list[str], what: str, share_symbols: bool = False) -> str | None:
    """Compile `sources` with `extra` flags, once per host, flags and text (every cpu_*.h beside them is part of
    that, so that a new header cannot be left out), as the ops library `stem`_<hash>, and load it; -> None, or why it
    failed (a missing compiler or ninja, a build error). `what` names it while it builds. share_symbols: its C
    entries made visible to libraries loaded later (inductor's compiled graphs call them: compile_settings.
    direct_entries)."""
    built = _library(stem, sources, extra)
    why = _build(built, sources, extra, what)
    if why is None and share_symbols:
        try:
            ctypes.CDLL(str(built), mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
        except OSError:
            pass  # its entries stay hidden: the compiled graphs call the ops through the dispatcher
    return why


def _library(stem: str, sources: list[Path], extra: list[str]) -> Path:
    """Where the ops library of these sources and flags is built: `stem`_<hash>/`stem`_<hash>.so."""
    files = [*sources, *sorted(sources[0].parent.glob("cpu_*.h"))]
    identity = [" ".join(extra), *(f.read_text() for f in files), " ".join(sorted(cpu_kind().flags)),
                torch.__version__]
    key = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:12]
    name = f"{stem}_{key}"
    return build_dir() / name / f"{name}.so"


def _build(built: Path, sources: list[Path], extra: list[str], what: str) -> str | None:
    """build()'s compile (into `built`, _library's path) and load."""
    folder, name = built.parent, built.stem
    folder.mkdir(parents=True, exist_ok=True)
    if built.exists():
        # The name holds the hash of everything the library is built from, so a library of that name is this one:
        # loaded as it is (torch's loader would rebuild it for another checkout's source paths)
        try:
            torch.ops.load_library(str(built))
            return None
        except OSError:
            pass  # cut short while it was written: built again below
    stale = folder / "lock"  # torch's build lock, left behind by a build that was killed: later builds wait forever
    try:
        if time.time() - stale.stat().st_mtime > STALE_LOCK_S:
            print(f"removing a build lock over {STALE_LOCK_S // 60} minutes old ({stale}): its build was cut short",
                  file=sys.stderr)
            stale.unlink(missing_ok=True)
    except OSError:
        pass  # no lock
    try:
        from torch.utils import cpp_extension

        if not built.exists():
            print(f"building {what} (once per host, about a minute)", file=sys.stderr)
        cpp_extension.load(name=name, sources=[str(f) for f in sources], build_directory=str(folder),
                           is_python_module=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp", *extra], extra_ldflags=["-fopenmp"],
                           verbose=bool(os.environ.get("LLMBENCH_DEBUG")))
    except Exception as exc:
        return one_line(exc)
    return None
