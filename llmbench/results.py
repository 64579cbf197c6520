"""Writing records (llmbench.records says what they hold): the environment a record names, and appends of one JSON
line, whole, so that earlier records survive any failure."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import transformers

from llmbench import __version__
from llmbench.devices import cpu_name, device_name
from llmbench.errors import UserError
from llmbench.host import cpu_kind
from llmbench.paths import PROJECT_ROOT


@cache
def git_commit() -> str | None:
    """The project's commit, with '-dirty' when the work tree has changes (None outside git)."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=PROJECT_ROOT, capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        commit = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def environment(device: torch.device) -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llmbench": __version__,
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "cpu_kind": cpu_kind().to_record(),  # model name, kind label and the flags that choose kernels
        "threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        "git_commit": git_commit(),
    }


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def check_appendable(path: Path) -> None:
    """Refuse, before any work, a results path that cannot take a record: a folder, a file that cannot be
    opened for appending, or a folder that cannot be created or written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--results {path} is a folder: give a file path, e.g. {path / 'results.jsonl'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with open(path, "ab"):
                pass  # opening for append changes nothing
        else:
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".llmbench-probe-"):
                pass
    except OSError as exc:
        raise UserError(f"--results {path} cannot be written ({exc.strerror or exc}): pass a writable path") \
            from None


def append_record(path: Path, record: dict) -> None:
    """Append one line with a single write and fsync, all or nothing: when the write or the fsync fails (disk
    full, quota, file-size limit) the file is cut back to its previous size, so no fragment is left behind. An
    interrupt (Ctrl-C, SIGTERM) never cuts it back: it lands before the single write (nothing written) or after it
    (the whole line written, kept).
    A file whose last line has no newline (cut short by an older writer) is repaired by ending that line
    first: the new record never runs into it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            print(f"warning: {path} ended in an unfinished line (an earlier write was cut short): it is kept on a "
                  "line of its own, and readers report it", file=sys.stderr)
            line = b"\n" + line
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes could be written")
            os.fsync(fd)
        except OSError:  # not an interrupt: Ctrl-C during the fsync of a written line must not erase the record
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def append_or_show(path: Path, record: dict, show_figures: Callable[[], None] | None = None) -> None:
    """append_record; when that fails, the figures and the record's JSON go to stdout, so nothing measured is lost,
    and the failure is one UserError."""
    try:
        append_record(path, record)
    except OSError as exc:
        if show_figures is not None:
            show_figures()
        print(json.dumps(record, default=str), flush=True)
        raise UserError(f"could not append the record to {path} ({exc.strerror or exc}): its JSON is printed on stdout "
                        "instead; free space or pass another --results, and save that line") from None
