"""Entry point of run_generation.py (and of each rank of run_generation_with_deepspeed.py, via llmbench.launcher):
parse the flags, dispatch to the benchmark or accuracy runner, map errors to one line and an exit status."""

from __future__ import annotations

import dataclasses
import os
import sys

from llmbench.accuracy import run_accuracy
from llmbench.benchmark import run_benchmark
from llmbench.cli import RunConfig, parse_config
from llmbench.errors import UserError, exception_name, one_line
from llmbench.pipeline import quiet_libraries
from llmbench.preflight import before_loading

__all__ = ["main", "quiet_libraries", "run"]  # benchmarks/roofline.py takes quiet_libraries from here


def run(config: RunConfig, world=None) -> int:
    if world is not None and not world.is_main:
        config = dataclasses.replace(config, quiet=True)  # rank 0 alone prints
    before_loading(config)
    if config.mode == "accuracy":
        return run_accuracy(config, world)
    return run_benchmark(config, world)


def main(argv: list[str] | None = None, prog: str | None = None, world=None) -> int:
    """User errors are one line on stderr and exit status 2, an interruption 130, anything else one line and 1:
    never a traceback (LLMBENCH_DEBUG=1 shows it)."""
    debug = bool(os.environ.get("LLMBENCH_DEBUG"))
    prog = prog or os.path.basename(sys.argv[0])
    try:
        config = parse_config(argv, prog)
        quiet_libraries(verbose=debug, no_progress=config.quiet, distributed=world is not None and world.size > 1)
        return run(config, world)
    except UserError as exc:
        if debug and exc.__cause__ is not None:  # a failure explained in one line: its traceback on request
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        recorded = getattr(exc, "recorded_iterations", 0)  # set by run_benchmark once measuring had begun
        kept = (f"the {recorded} iteration(s) measured so far were recorded in {config.results}" if recorded
                else "nothing was recorded")
        print(f"{prog}: interrupted; {kept}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if debug:
            raise
        print(f"{prog}: error: {exception_name(exc)}: {one_line(exc)} (set LLMBENCH_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
