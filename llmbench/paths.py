"""Where the project's own files are, and where converted models, kernels and host figures are cached."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROMPT_FILE = PROJECT_ROOT / "prompt.json"


def cache_dir() -> Path:
    """Where converted checkpoints, compiled kernels and host figures live (LLMBENCH_CACHE, else ~/.cache/llmbench)."""
    return Path(os.environ.get("LLMBENCH_CACHE", Path.home() / ".cache" / "llmbench"))
