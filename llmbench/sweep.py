"""One-click sweeps: env vars -> the cartesian product of cases -> one resumable run folder with a report.

The shell drivers (run_benchmark.sh, run_accuracy.sh, ...) only exec `python -m llmbench.sweep --kind KIND`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llmbench.cli import BACKENDS, DEFAULT_ACC_TASK, DEVICES, DTYPES
from llmbench.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MAX_EXIT_FAILURES = 125
WOQ_CHOICES = ("none", "int4", "int8")


def _int(minimum: int) -> Callable[[str, str], int]:
    def parse(env: str, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise UserError(f"{env}={text!r} is not an integer: give whole numbers, e.g. {env}=\"1 2\"") from None
        if value < minimum:
            raise UserError(f"{env}={text} must be at least {minimum}")
        return value
    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[str, str], str | None]:
    def parse(env: str, text: str) -> str | None:
        if text not in choices:
            raise UserError(f"{env}={text!r} is unknown: choose from {' '.join(choices)}")
        return None if text == "none" else text
    return parse


def _model(env: str, text: str) -> str:
    # A local folder or file is made absolute, so the same sweep from another folder finds the same run.
    if os.path.exists(text):
        return str(Path(text).resolve())
    if text.startswith(("/", "./", "../", "~")):
        raise UserError(f"{env}={text}: no such file or folder")
    return text  # a hub id


def _task(env: str, text: str) -> str:
    return ",".join(t for t in text.split(",") if t)


@dataclass(frozen=True)
class Axis:
    """One env var of a sweep: how its words parse, the CLI flag it becomes, the record key it matches."""

    env: str
    flag: str | None  # None: given to the launcher (mpirun -np), not to the script
    record_key: str  # key in record["config"] (world_size: top level)
    parse: Callable[[str, str], object]
    default: str  # "" = leave the flag out (the CLI's own default)


MODEL = Axis("model", "-m", "model_id", _model, "")
BEAM = Axis("beam", "--num-beams", "num_beams", _int(1), "4")
INPUT = Axis("input", "--input-tokens", "input_tokens", _int(1), "1024")
OUTPUT = Axis("output", "--max-new-tokens", "max_new_tokens", _int(1), "128")
BS = Axis("bs", "--batch-size", "batch_size", _int(1), "1")
ITER = Axis("iter", "--num-iter", "num_iter", _int(1), "10")
WARMUP = Axis("warmup", "--num-warmup", "num_warmup", _int(0), "3")
DTYPE = Axis("dtype", "--dtype", "dtype", _choice(DTYPES), "")
DEVICE = Axis("device", "--device", "device", _choice(DEVICES), "auto")
BACKEND = Axis("backend", "--backend", "backend", _choice(BACKENDS), "eager")
WOQ_BENCH = Axis("woq", "--woq", "woq", _choice(WOQ_CHOICES), "int4")
WOQ_ACC = Axis("woq", "--woq", "woq", _choice(WOQ_CHOICES), "none")
TASK = Axis("task", "--acc-tasks", "acc_tasks", _task, DEFAULT_ACC_TASK)
ACC_BS = Axis("bs", "--acc-batch-size", "acc_batch_size", _int(1), "1")
NP = Axis("np", None, "world_size", _int(1), "2")

BENCH_AXES = (MODEL, BEAM, INPUT, OUTPUT, BS, ITER, WARMUP, DTYPE, DEVICE, BACKEND)
ACC_AXES = (MODEL, DTYPE, DEVICE, BACKEND, WOQ_ACC, TASK, ACC_BS)


@dataclass(frozen=True)
class Kind:
    script: str
    mode: str
    mode_flags: tuple[str, ...]
    axes: tuple[Axis, ...]
    mpi: bool = False


KINDS = {
    "benchmark": Kind("run_generation.py", "benchmark", ("--benchmark", "--token-latency"), BENCH_AXES),
    "woq": Kind("run_generation.py", "benchmark", ("--benchmark", "--token-latency"), BENCH_AXES + (WOQ_BENCH,)),
    "accuracy": Kind("run_generation.py", "accuracy", ("--accuracy-only",), ACC_AXES),
    "ds-benchmark": Kind("run_generation_with_deepspeed.py", "benchmark", ("--benchmark", "--token-latency"),
                         BENCH_AXES + (NP,), mpi=True),
    "ds-accuracy": Kind("run_generation_with_deepspeed.py", "accuracy", ("--accuracy-only",), ACC_AXES + (NP,),
                        mpi=True),
}


@dataclass
class Plan:
    """A validated sweep: its cases (axis env name -> value) and everything that names its run folder."""

    kind_name: str
    kind: Kind
    values: dict[str, list]
    extra_args: list[str]
    acc_data_dir: str | None
    results_dir: Path
    quiet: bool
    cases: list[dict] = field(default_factory=list)
    rerun_invalid: bool = False  # RERUN_INVALID=1: a case whose records are all `valid: false` runs again

    def identity(self) -> dict:
        return {"kind": self.kind_name, "axes": self.values, "extra_args": self.extra_args,
                "acc_data_dir": self.acc_data_dir}

    def folder_name(self) -> str:
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        models = self.values["model"]
        label = "default" if models == [None] else Path(str(models[0])).name.removesuffix(".gguf")
        if len(models) > 1:
            label += f"+{len(models) - 1}"
        return f"{self.kind_name}-{re.sub(r'[^A-Za-z0-9._-]+', '_', label)[:40]}-{digest}"


def owned_flags(kind: Kind) -> set[str]:
    flags = {a.flag for a in kind.axes if a.flag} | set(kind.mode_flags)
    return flags | {"--results", "--greedy", "--model-id", "--ipex", "--acc-data-dir"}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def check_hub_model(model_id: str, env: Mapping[str, str]) -> None:
    """Offline, a hub id must be in the hub cache already: else every case of it would start and fail."""
    if not (_truthy(env.get("HF_HUB_OFFLINE")) or _truthy(env.get("TRANSFORMERS_OFFLINE"))):
        return  # online, a case downloads what it needs
    from huggingface_hub import try_to_load_from_cache

    home = env.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    cache = env.get("HF_HUB_CACHE") or os.path.join(home, "hub")
    try:
        cached = try_to_load_from_cache(model_id, "config.json", cache_dir=cache)
    except ValueError:  # not a valid repo id
        cached = None
    if not isinstance(cached, str):
        raise UserError(f"model={model_id}: not a local file or folder, and not in the hub cache {cache} (offline: "
                        "HF_HUB_OFFLINE is set): download it first, or give a local folder or .gguf file")


def owned_flags_in(kind: Kind, extra: list[str]) -> list[str]:
    """The flags the sweep owns that `extra` sets, found by the entry scripts' own parser, so that every spelling
    it accepts (--num-beams=2, -m) counts; a word it would refuse is refused here, before any case runs."""
    from llmbench.cli import build_parser

    parser = build_parser("EXTRA_ARGS")

    def refuse(message: str) -> None:
        raise UserError(f"EXTRA_ARGS={shlex.join(extra)!r}: {message}")

    parser.error = refuse  # type: ignore[method-assign]
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # parsed values are then exactly the flags given
    try:
        given = vars(parser.parse_args(extra))
    except SystemExit:  # --help
        raise UserError("EXTRA_ARGS may not ask for --help: run python run_generation.py --help") from None
    by_dest = {parser._option_string_actions[f].dest: f for f in owned_flags(kind)
               if f in parser._option_string_actions}
    return sorted(flag for dest, flag in by_dest.items() if dest in given)


def make_plan(kind_name: str, env: Mapping[str, str]) -> Plan:
    """Parse and validate every env var before any work: a bad value is one UserError."""
    if kind_name not in KINDS:
        raise UserError(f"unknown sweep kind {kind_name!r}: choose from {', '.join(KINDS)}")
    kind = KINDS[kind_name]
    values: dict[str, list] = {}
    for axis in kind.axes:
        words = (env.get(axis.env) or axis.default).split()
        parsed = [axis.parse(axis.env, w) for w in words] or [None]
        values[axis.env] = list(dict.fromkeys(parsed))  # drop repeats, keep order
    try:
        extra = shlex.split(env.get("EXTRA_ARGS", ""))
    except ValueError as exc:
        raise UserError(f"EXTRA_ARGS cannot be split into words: {exc}") from None
    clash = owned_flags_in(kind, extra)
    if clash:
        raise UserError(f"EXTRA_ARGS repeats {' '.join(clash)}, which the sweep sets: use the env vars instead")
    if "--dummy-weights" not in extra:  # dummy weights need a config only (built in, or a local file)
        for model in values.get("model", []):
            if model is not None and not os.path.exists(model):
                check_hub_model(model, env)
    script = PROJECT_ROOT / kind.script
    if not script.exists():
        raise UserError(f"{kind.script} is missing from {PROJECT_ROOT}: this sweep kind cannot run here")
    if kind.mpi and shutil.which("mpirun") is None:
        raise UserError("mpirun is not on PATH: install MPI (pip install mpich) for the distributed sweeps")
    acc_dir = env.get("ACC_DATA_DIR") or None
    if acc_dir and not Path(acc_dir).is_dir():
        raise UserError(f"ACC_DATA_DIR={acc_dir} is not a folder")
    rerun_invalid = env.get("RERUN_INVALID", "")
    if rerun_invalid not in ("", "0", "1"):
        raise UserError(f"RERUN_INVALID={rerun_invalid!r}: set it to 1 (rerun cases recorded as not valid) or 0")
    plan = Plan(kind_name, kind, values, extra, str(Path(acc_dir).resolve()) if acc_dir else None,
                Path(env.get("RESULTS_DIR") or "results"), env.get("QUIET", "") not in ("", "0"),
                rerun_invalid=rerun_invalid == "1")
    names = list(values)
    plan.cases = [dict(zip(names, combo)) for combo in itertools.product(*values.values())]
    return plan


def case_command(plan: Plan, case: dict, results: Path) -> list[str]:
    cmd = [sys.executable, str(PROJECT_ROOT / plan.kind.script), *plan.kind.mode_flags]
    for axis in plan.kind.axes:
        value = case[axis.env]
        if value is not None and axis.flag:
            cmd += [axis.flag, str(value)]
    if plan.acc_data_dir and plan.kind.mode == "accuracy":
        cmd += ["--acc-data-dir", plan.acc_data_dir]
    cmd += ["--results", str(results), *plan.extra_args]
    if plan.kind.mpi:
        cmd = ["mpirun", "-np", str(case["np"]), "--prepend-rank", *cmd]
    return cmd


def case_label(plan: Plan, case: dict) -> str:
    """The case's values that vary in this sweep (all of them when none varies), as 'name=value' words."""
    varying = [a.env for a in plan.kind.axes if len(plan.values[a.env]) > 1] or ["model"]
    def show(name: str) -> str:
        value = case[name]
        if name == "model":
            return "default" if value is None else Path(str(value)).name
        return ("none" if name == "woq" else "default") if value is None else str(value)

    return " ".join(f"{name}={show(name)}" for name in varying)


def _record_value(record: dict, key: str):
    if key == "world_size":
        return record.get("world_size", 1)
    config = record.get("config") or {}
    value = config.get(key, record.get(key))
    if key == "acc_tasks" and isinstance(value, list):
        value = ",".join(value)
    return value


def case_records(plan: Plan, case: dict, records: list[dict]) -> list[dict]:
    """The complete records of this run folder that have exactly this case's parameters."""
    return [r for r in records if r.get("mode", plan.kind.mode) == plan.kind.mode and r.get("complete", True)
            and all(_record_value(r, a.record_key) == case[a.env] for a in plan.kind.axes)]


def is_recorded(plan: Plan, case: dict, records: list[dict]) -> bool:
    """True when a complete record has this case's parameters; with RERUN_INVALID=1 it must not be `valid: false`
    (a record from before validity was recorded has none, and counts)."""
    found = case_records(plan, case, records)
    return any(r.get("valid") is not False for r in found) if plan.rerun_invalid else bool(found)


def read_records(path: Path) -> list[dict]:
    """The records of `path` so far (none when it does not exist yet); unreadable lines are reported."""
    from llmbench.results import read_records as read_jsonl

    return read_jsonl(path, missing_ok=True)


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
    done = [is_recorded(plan, case, read_records(results)) for case in plan.cases]
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
            before = read_records(results)
            again = " (recorded as not valid: running it again)" if case_records(plan, case, before) else ""
            say(f"case {k}/{n}: {label}{again}" + (f" (ETA {eta(started, ran, todo)})" if ran else ""))
            log = run_dir / "logs" / f"case{k:03d}-{re.sub(r'[^A-Za-z0-9.=_-]+', '_', label)[:80]}.log"
            rc = run_case(case_command(plan, case, results), log)
            ran += 1
            new = case_records(plan, case, read_records(results)[len(before):])
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
    from llmbench.report import write_report

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
