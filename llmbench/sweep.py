"""One-click sweeps: a plan's cases (llmbench.sweep_plan) run one by one, each a process of its own, into one
resumable run folder with a report.

The shell drivers (run_benchmark.sh, run_accuracy.sh, ...) only exec `python -m llmbench.sweep --kind KIND`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from llmbench.errors import UserError
from llmbench.records import read_records
from llmbench.report import write_report
from llmbench.sweep_plan import KINDS, Plan, case_command, case_label, case_records, is_recorded, make_plan

MAX_EXIT_FAILURES = 125


def _death_signal_setter() -> Callable[[], None] | None:
    """Linux: a case gets SIGTERM if the sweep itself is killed, so no orphan keeps the CPU busy."""
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # loaded before fork: the child only calls it
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_case(proc: subprocess.Popen) -> None:
    """Ctrl-C: a case that did not get the terminal's SIGINT gets one (it records finished iterations as
    incomplete and exits); one still running 15 s later is killed."""
    for sig, wait_s in ((None, 3), (signal.SIGINT, 12), (signal.SIGKILL, None)):
        if proc.poll() is not None:
            return
        if sig is not None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass


def run_case(cmd: list[str], log: Path) -> int:
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                preexec_fn=_death_signal_setter())  # noqa: PLW1509 - no threads run here
        try:
            return proc.wait()
        except BaseException:
            stop_case(proc)
            raise


def last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1][-300:] if lines else "(empty log)"


def eta(started: float, ran: int, todo: int) -> str:
    """Time left, from the mean duration of the cases run so far."""
    left_s = (time.monotonic() - started) / ran * (todo - ran)
    return time.strftime("%H:%M:%S", time.gmtime(left_s))


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_sweep(plan: Plan) -> int:
    """Run every case not yet recorded; returns the number of failed cases (130 when interrupted)."""
    from tqdm.auto import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: cases are forked from a single-threaded process

    run_dir = plan.results_dir / plan.folder_name()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "sweep.json").write_text(json.dumps(plan.identity(), indent=2) + "\n", encoding="utf-8")
    results = run_dir / "results.jsonl"
    n = len(plan.cases)
    done = [is_recorded(plan, case, read_records(results, missing_ok=True)) for case in plan.cases]
    say = (lambda msg: None) if plan.quiet else (lambda msg: tqdm.write(msg, file=sys.stderr))
    say(f"sweep of {n} cases in {run_dir}" + (f" ({sum(done)} already recorded)" if any(done) else ""))
    failed = 0
    signal.signal(signal.SIGTERM, _raise_interrupt)
    todo = n - sum(done)
    # The bar shows only on a terminal (disable=None); the "case k/n" lines with an ETA go to logs as well.
    bar = tqdm(total=n, initial=n - todo, unit="case", file=sys.stderr, disable=None if not plan.quiet else True,
               dynamic_ncols=True, leave=False)
    started, ran = time.monotonic(), 0
    try:
        for k, (case, recorded) in enumerate(zip(plan.cases, done), start=1):
            label = case_label(plan, case)
            if recorded:
                say(f"case {k}/{n}: {label}: already recorded, skipped")
                continue
            bar.set_description(f"case {k}/{n}")
            before = read_records(results, missing_ok=True)
            again = " (recorded as not valid: running it again)" if case_records(plan, case, before) else ""
            say(f"case {k}/{n}: {label}{again}" + (f" (ETA {eta(started, ran, todo)})" if ran else ""))
            log = run_dir / "logs" / f"case{k:03d}-{re.sub(r'[^A-Za-z0-9.=_-]+', '_', label)[:80]}.log"
            rc = run_case(case_command(plan, case, results), log)
            ran += 1
            new = case_records(plan, case, read_records(results, missing_ok=True)[len(before):])
            if rc != 0 or not new:
                failed += 1
                why = f"exit {rc}" if rc else "no complete record"
                tqdm.write(f"case {k}/{n} failed ({why}): {last_line(log)} [log: {log}]", file=sys.stderr)
            elif new[-1].get("valid") is False:
                reasons = "; ".join((new[-1].get("validity") or {}).get("reasons") or [])
                say(f"case {k}/{n}: not valid ({reasons}): RERUN_INVALID=1 runs it again on resume")
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: run the same command again to resume; finished cases are kept in {results}",
              file=sys.stderr)
        print(run_dir, flush=True)
        return 130
    bar.close()
    write_summary(run_dir, plan.quiet)
    if failed:
        print(f"{failed} of {n} cases failed: see the logs in {run_dir / 'logs'}", file=sys.stderr)
    print(run_dir, flush=True)
    return min(failed, MAX_EXIT_FAILURES)


def write_summary(run_dir: Path, quiet: bool) -> None:
    try:
        table = write_report([run_dir], run_dir)
    except UserError as exc:
        print(f"no report: {exc}", file=sys.stderr)
        return
    if not quiet:
        print(table, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmbench.sweep", description=(
        "Run the cartesian product of the env vars' values (model, beam, input, output, bs, iter, warmup, dtype, "
        "device, backend, woq, task, np) as one resumable sweep; see docs/sweeps.md."))
    parser.add_argument("--kind", choices=sorted(KINDS), default="benchmark")
    args = parser.parse_args(argv)
    prog = {"benchmark": "run_benchmark.sh", "woq": "run_benchmark_woq.sh", "accuracy": "run_accuracy.sh",
            "ds-benchmark": "run_benchmark_ds.sh", "ds-accuracy": "run_accuracy_ds.sh"}[args.kind]
    # Ctrl-C stops the sweep even when a shell started it with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        plan = make_plan(args.kind, os.environ)
        return run_sweep(plan)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
