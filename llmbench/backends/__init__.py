"""Optimization backends: each prepares a loaded model and generates exactly N new tokens with it."""

from __future__ import annotations

from llmbench.backends.base import Backend
from llmbench.errors import UserError


def get_backend(name: str) -> Backend:
    if name == "eager":
        from llmbench.backends.eager import EagerBackend

        return EagerBackend()
    if name == "compile":
        from llmbench.backends.compiled import CompileBackend

        return CompileBackend()
    if name == "ipex":
        from llmbench.backends.ipex import IpexBackend

        return IpexBackend()
    raise UserError(f"unknown backend {name!r}: choose eager, compile or ipex")


__all__ = ["Backend", "get_backend"]
