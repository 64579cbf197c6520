"""A sweep's plan: env vars -> validated axes -> the cartesian product of cases, and which of them a run folder's
records already hold. Each axis is one flag of the entry scripts' parser (llmbench.cli), which also gives its type,
choices, default and the record key it is matched on; only what a sweep sets differently is written here."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llmbench.cli import build_parser, positive_int
from llmbench.errors import UserError
from llmbench.paths import PROJECT_ROOT
from llmbench.records import requested


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
    """One env var of a sweep and the flag of llmbench.cli it sets. Its words parse by that flag's type and
    choices ("none": leave out a flag whose default is None) unless `words` parses them; `default` None takes the
    flag's own default, "" leaves the flag out."""

    env: str
    flag: str | None  # None: given to the launcher (mpirun -np), not to the script
    default: str | None = None
    words: Callable[[str, str], object] | None = None

    def action(self) -> argparse.Action | None:
        return build_parser()._option_string_actions[self.flag] if self.flag else None

    @property
    def record_key(self) -> str:
        """Where a record holds the value: its requested setting (llmbench.records.requested)."""
        action = self.action()
        return action.dest if action else "world_size"

    def default_words(self) -> str:
        if self.default is not None:
            return self.default
        action = self.action()
        return "" if action is None or action.default is None else str(action.default)

    def parse(self, text: str):
        if self.words is not None:
            return self.words(self.env, text)
        action = self.action()
        choices = action.choices if action is not None else None
        if choices is not None:
            if text == "none" and action.default is None:
                return None
            if text not in choices:
                raise UserError(f"{self.env}={text!r} is unknown: choose from {' '.join(choices)}")
            return text
        convert = action.type if action is not None and action.type else positive_int
        try:
            return convert(text)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise UserError(f"{self.env}={text!r}: {exc}") from None


MODEL = Axis("model", "-m", "", _model)
BEAM = Axis("beam", "--num-beams")
INPUT = Axis("input", "--input-tokens", "1024")
OUTPUT = Axis("output", "--max-new-tokens", "128")
BS = Axis("bs", "--batch-size")
ITER = Axis("iter", "--num-iter")
WARMUP = Axis("warmup", "--num-warmup")
DTYPE = Axis("dtype", "--dtype")
DEVICE = Axis("device", "--device")
BACKEND = Axis("backend", "--backend")
WOQ_BENCH = Axis("woq", "--woq", "int4")
WOQ_ACC = Axis("woq", "--woq")
TASK = Axis("task", "--acc-tasks", None, _task)
ACC_BS = Axis("bs", "--acc-batch-size")
NP = Axis("np", None, "2")
# Flags a sweep sets itself, beside its axes and its kind's mode flags: EXTRA_ARGS may not repeat them.
SWEEP_FLAGS = ("--results", "--greedy", "--ipex", "--acc-data-dir")

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
    return {a.flag for a in kind.axes if a.flag} | set(kind.mode_flags) | set(SWEEP_FLAGS)


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
        words = (env.get(axis.env) or axis.default_words()).split()
        parsed = [axis.parse(w) for w in words] or [None]
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
    value = requested(record, key)
    if key == "world_size":
        return value or 1
    return ",".join(value) if key == "acc_tasks" and isinstance(value, list) else value


def case_records(plan: Plan, case: dict, records: list[dict]) -> list[dict]:
    """The complete records of this run folder that have exactly this case's parameters."""
    return [r for r in records if r.get("mode", plan.kind.mode) == plan.kind.mode and r.get("complete", True)
            and all(_record_value(r, a.record_key) == case[a.env] for a in plan.kind.axes)]


def is_recorded(plan: Plan, case: dict, records: list[dict]) -> bool:
    """True when a complete record has this case's parameters; with RERUN_INVALID=1 it must not be `valid: false`
    (a record from before validity was recorded has none, and counts)."""
    found = case_records(plan, case, records)
    return any(r.get("valid") is not False for r in found) if plan.rerun_invalid else bool(found)
