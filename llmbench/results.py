"""One JSON record per run: appended to a JSONL file whole, so earlier records survive any failure."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import subprocess
from functools import cache
from pathlib import Path

import torch

from llmbench import __version__
from llmbench.devices import cpu_name, device_name
from llmbench.host import cpu_kind

PROJECT_ROOT = Path(__file__).resolve().parent.parent


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
    import transformers

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


def append_record(path: Path, record: dict) -> None:
    """Append one line with a single write and fsync: a crash cannot leave half a record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
