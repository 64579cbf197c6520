"""Differences between the transformers releases the suite runs on (4.51 for IPEX, and the newest)."""

from __future__ import annotations

import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)

# from_pretrained/from_config took `torch_dtype` until 4.56 renamed it `dtype`.
DTYPE_KWARG = "dtype" if TRANSFORMERS_VERSION >= Version("4.56") else "torch_dtype"


def dtype_kwargs(dtype) -> dict:
    return {DTYPE_KWARG: dtype}
