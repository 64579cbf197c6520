"""Optimization backends: each prepares a loaded model and generates exactly N new tokens with it.

BACKENDS is the one place a backend is named: the CLI's --backend choices, get_backend, the sweeps' backend axis,
the record's `backend_overrides` and benchmarks/backends.py all read it. A backend's module is imported only when
the backend is chosen (`module:Class`), so naming one costs nothing.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from llmbench.errors import UserError


@dataclass(frozen=True)
class BackendEntry:
    make: str | Callable[[], object]  # "module:Class", or a callable returning a llmbench.backends.base.Backend
    # Environment variables that override the backend's options (RunConfig fields, flags); a record names those set.
    overrides: tuple[str, ...] = ()


BACKENDS: dict[str, BackendEntry] = {
    "eager": BackendEntry("llmbench.backends.eager:EagerBackend"),
    "compile": BackendEntry("llmbench.backends.compiled:CompileBackend",
                            ("LLMBENCH_COMPILE_MODE", "LLMBENCH_COMPILE_KERNELS", "LLMBENCH_INDUCTOR_OPTIONS")),
    "ipex": BackendEntry("llmbench.backends.ipex:IpexBackend"),
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # --compile-mode


def register(name: str, make: str | Callable[[], object], overrides: tuple[str, ...] = ()) -> None:
    """Add (or replace) a backend: it becomes a --backend choice, a sweep value and a benchmarked backend."""
    BACKENDS[name] = BackendEntry(make, overrides)


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def get_backend(name: str):
    """A new, unprepared backend; one that cannot run here (a missing package) raises UserError at once."""
    entry = BACKENDS.get(name)
    if entry is None:
        raise UserError(f"unknown backend {name!r}: choose {', '.join(BACKENDS)}")
    make = entry.make
    if isinstance(make, str):
        module, _, attr = make.partition(":")
        make = getattr(importlib.import_module(module), attr)
    return make()


def backend_overrides(name: str) -> dict[str, str]:
    """The override variables of backend `name` that are set in this environment, as the record states them."""
    entry = BACKENDS.get(name)
    return {var: os.environ[var] for var in (entry.overrides if entry else ()) if os.environ.get(var)}
