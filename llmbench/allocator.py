"""The process's memory allocator: jemalloc or tcmalloc in place of glibc's malloc, as Intel's and PyTorch's CPU
performance guides advise. A decode step allocates and frees a few hundred tensors (each op's output, the compiled
graph's buffers) after its weights' stream has pushed every allocator's bookkeeping out of the caches; glibc's
malloc then walks cold bins (its `_int_free`, `_int_malloc` and `malloc_consolidate` were ~3% of a beam-4 step's
samples). Default model, compile bf16, 2-vCPU AMD EPYC family 26, ms/token, glibc / jemalloc / tcmalloc: greedy
3.54 / 3.25 / 3.24, beam 4 4.40 / 4.14 / 4.14, batch 8 5.12 / 4.84 / 5.18; eager beam 4 26.4 / 24.5 / 23.9, eager
INT8 greedy 38.5 / 38.5 / 28.1 (docs/measured.md); auto takes jemalloc first, for the compile backend's batches.
jemalloc starts with JEMALLOC_CONF (where MALLOC_CONF is unset): eager INT8 then takes 29.2 ms.

An allocator takes effect only from a process's start (LD_PRELOAD), so the entry scripts call
restart_with_allocator() before anything else loads: where --allocator (auto by default) names one that is found
and none is in the process yet, the same command starts again in its place (exec: the same process id and
environment, plus LD_PRELOAD). Every record names the allocator the run had (`environment.allocator`). This module
needs nothing beyond the standard library."""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

CHOICES = ("auto", "jemalloc", "tcmalloc", "system")
LIBRARIES = {"jemalloc": ("jemalloc",), "tcmalloc": ("tcmalloc_minimal", "tcmalloc")}
RESTARTED = "LLMBENCH_ALLOCATOR_RESTARTED"  # set in a restarted process (its value: the allocator preloaded)
# jemalloc keeps the pages it has freed instead of handing them back over time: TorchAO's eager INT8 linears allocate
# and free tens of MB per call, and with jemalloc's default decay each reuse faulted its pages in again (default
# model, eager INT8 greedy, 2 alternating pairs: 38.5 / 39.8 -> 29.1 / 29.4 ms/token, tcmalloc 28.5 / 28.7; peak
# memory +0.7%; dirty_decay_ms:60000 or muzzy_decay_ms:-1 alone, or oversize_threshold:0, changed nothing; compile
# bf16 batch 8, eager bf16 beam 4 and eager INT4 level).
JEMALLOC_CONF = "dirty_decay_ms:-1"
NONE_FOUND = "no jemalloc or tcmalloc found"  # the start of `reason` where neither is installed
HOW_TO_INSTALL = "Debian/Ubuntu: apt install libjemalloc2 (bash setup.sh does, as root); conda: conda install " \
    "-c conda-forge jemalloc"


def requested(argv: list[str]) -> str:
    """--allocator's value in a command line ('auto' where absent, or not one of CHOICES: argparse reports a bad
    value later, in one line)."""
    for i, arg in enumerate(argv):
        flag, equals, value = arg.partition("=")
        if flag == "--allocator":
            value = value if equals else argv[i + 1] if i + 1 < len(argv) else ""
            return value if value in CHOICES else "auto"
    return "auto"


def find(name: str) -> str | None:
    """Where the allocator's library is: in the active environment (conda, a venv) first, then among the system's
    (ldconfig's names); None if nowhere."""
    for prefix in dict.fromkeys(p for p in (os.environ.get("CONDA_PREFIX"), sys.prefix) if p):
        for library in LIBRARIES[name]:
            found = sorted(Path(prefix, "lib").glob(f"lib{library}.so*"))
            if found:
                return str(found[0])
    for library in LIBRARIES[name]:
        found = ctypes.util.find_library(library)
        if found:
            return found
    return None


def loaded() -> tuple[str, str | None]:
    """The allocator mapped into this process: ('tcmalloc' | 'jemalloc', its library's path), else ('system',
    None)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system", None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, permissions, offset, device, inode[, path]
        path = fields[5] if len(fields) == 6 else ""
        base = os.path.basename(path)
        for name, libraries in LIBRARIES.items():
            if any(base.startswith(f"lib{library}.so") for library in libraries):
                return name, path
    return "system", None


def restart_with_allocator(argv: list[str] | None = None) -> None:
    """At an entry script's start, before torch loads: where --allocator (auto: jemalloc, else tcmalloc) names an
    allocator that is found, none is in this process yet and it was not restarted already, start the same command
    again with the library in LD_PRELOAD. Returns where it does not restart (main() then reports why in the
    record, or refuses an allocator asked for by name that this process lacks). Linux only."""
    if not sys.platform.startswith("linux") or os.environ.get(RESTARTED):
        return
    want = requested(sys.argv[1:] if argv is None else argv)
    if want == "system" or loaded()[0] != "system":
        return
    for name in ("jemalloc", "tcmalloc") if want == "auto" else (want,):
        library = find(name)
        if library:
            break
    else:
        return
    env = dict(os.environ, **{RESTARTED: name})
    env["LD_PRELOAD"] = ":".join(p for p in (library, os.environ.get("LD_PRELOAD")) if p)
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))  # no line per allocation over 1 GiB
    if name == "jemalloc" and not env.get("MALLOC_CONF"):  # the user's options stand
        env["MALLOC_CONF"] = JEMALLOC_CONF
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return  # the run goes on with the allocator it has, which its record names


def state(want: str = "auto") -> dict:
    """The record's `environment.allocator`: the allocator in this process (name: tcmalloc, jemalloc or system,
    the C library's malloc; library: its path) and why. Raises
    UserError where `want` names one this process lacks (or 'system' where another is in it)."""
    from llmbench.errors import UserError

    name, library = loaded()
    if want in LIBRARIES and name != want:
        found = find(want)
        if not found:
            raise UserError(f"--allocator {want}: no lib{LIBRARIES[want][0]} found ({HOW_TO_INSTALL}), or use "
                            "--allocator auto")
        raise UserError(f"--allocator {want}: this process started without it (run the entry script itself, "
                        f"which restarts with it, or set LD_PRELOAD={found})")
    if want == "system" and name != "system":
        raise UserError(f"--allocator system: this process has {name} ({library}), from LD_PRELOAD: unset it")
    if name != "system":
        how = f"preloaded at the entry script's restart (--allocator {want})" if os.environ.get(RESTARTED) \
            else "in the process from its start (LD_PRELOAD)"
    elif want == "system":
        how = "--allocator system"
    elif any(find(n) for n in LIBRARIES):
        how = "jemalloc or tcmalloc is installed, but this process did not start through an entry script"
    else:
        how = f"{NONE_FOUND} ({HOW_TO_INSTALL})"
    out = {"name": name, "library": library, "reason": how}
    if name == "jemalloc":  # its options (JEMALLOC_CONF from the restart, or the user's)
        out["malloc_conf"] = os.environ.get("MALLOC_CONF") or "jemalloc's defaults"
    return out
