"""lm-eval accuracy of the same optimized model the benchmark times; shipped task definitions read local data."""

from __future__ import annotations

import difflib
import hashlib
import logging
from pathlib import Path

import torch
import yaml

from llmbench.backends.cpu_kernels import SCORED_WITH as SCORED_WITH_KERNELS
from llmbench.cli import RunConfig
from llmbench.errors import UserError, one_line
from llmbench.pipeline import open_pipeline
from llmbench.results import append_or_show

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def shipped_tasks() -> dict[str, Path]:
    """Task name -> the project's YAML that reads the task's data from --acc-data-dir."""
    return {yaml.safe_load(p.read_text(encoding="utf-8"))["task"]: p for p in sorted(TASKS_DIR.glob("*.yaml"))}


def local_task_config(yaml_path: Path, data_dir: Path) -> dict:
    """A shipped task definition with its data files resolved inside data_dir (which must hold them)."""
    config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    files = config.get("dataset_kwargs", {}).get("data_files", {})
    resolved = {}
    for split, name in files.items():
        path = (data_dir / name).resolve()
        if not path.is_file():
            raise UserError(f"--acc-data-dir {data_dir} has no {name} (needed by task {config['task']}): "
                            "pass the folder that holds it")
        resolved[split] = str(path)
    config["dataset_kwargs"] = {**config.get("dataset_kwargs", {}), "data_files": resolved}
    return config


def task_specs(names: list[str], data_dir: Path | None) -> tuple[list[str | dict], bool]:
    """-> (what lm-eval loads: inline configs for shipped tasks with local data, names otherwise;
    whether lm-eval's built-in task index is needed)."""
    if data_dir is not None and not data_dir.is_dir():
        raise UserError(f"--acc-data-dir {data_dir}: no such folder")
    shipped = shipped_tasks() if data_dir is not None else {}
    specs = [local_task_config(shipped[n], data_dir) if n in shipped else n for n in names]
    return specs, any(isinstance(s, str) for s in specs)


def load_tasks(names: list[str], data_dir: Path | None) -> dict:
    """-> {task name: lm-eval Task, data loaded}, built up front so that a bad name or unreachable data is one
    clear line before any model loads. A group (e.g. mmlu) becomes its leaf tasks."""
    from lm_eval.tasks import TaskManager

    specs, need_builtin = task_specs(names, data_dir)
    manager = TaskManager(include_defaults=need_builtin)
    for spec in specs:
        if isinstance(spec, str) and spec not in manager.all_tasks:
            close = difflib.get_close_matches(spec, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"--acc-tasks: unknown lm-eval task {spec!r}{hint}")
    task_dict = {}
    for name, spec in zip(names, specs):
        try:
            task_dict.update(manager.load(spec)["tasks"])
        except (ConnectionError, OSError, ValueError, ImportError, RuntimeError) as exc:
            shipped = shipped_tasks().get(name)
            if shipped is not None:
                files = ", ".join(yaml.safe_load(shipped.read_text(encoding="utf-8"))["dataset_kwargs"]["data_files"]
                                  .values())
                hint = f"pass --acc-data-dir DIR (a folder holding {files}) to run it offline"
            else:
                hint = "its dataset must be reachable or in the HF datasets cache"
            raise UserError(f"task {name}: cannot load its dataset ({one_line(exc)}): {hint}") from exc
    return task_dict


def make_lm(model: torch.nn.Module, tokenizer, batch_size: int, show_progress: bool):
    """lm-eval's HFLM around an already-built (optimized, quantized) model object."""
    from lm_eval.models.huggingface import HFLM

    class ProgressHFLM(HFLM):
        """HFLM whose progress bars follow --quiet (lm-eval only turns them off for ranks other than 0)."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not show_progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not show_progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not show_progress)

    return ProgressHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def quiet_lm_eval(quiet: bool) -> None:
    """lm-eval logs warnings; --quiet (and ranks other than 0) keep errors only and hide dataset progress."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR if quiet else logging.WARNING)
    if quiet:
        import datasets

        datasets.disable_progress_bars()


def evaluate(model: torch.nn.Module, tokenizer, config: RunConfig, rank: int = 0,
             task_dict: dict | None = None) -> dict | None:
    """Run config.acc_tasks (or the prebuilt task_dict from load_tasks) on `model` with lm-eval;
    -> lm-eval's results dict plus "data_sources" (None on ranks other than 0).

    Distributed runs call this on every rank in lockstep with the inner module (engine.module) and the same
    fixed batch size; only rank 0 gets results back and writes records."""
    from lm_eval.evaluator import simple_evaluate

    quiet_lm_eval(config.quiet or rank != 0)
    if task_dict is None:
        task_dict = load_tasks(config.acc_tasks, config.acc_data_dir)
    lm = make_lm(model, tokenizer, config.acc_batch_size, show_progress=not config.quiet and rank == 0)
    with torch.inference_mode():
        results = simple_evaluate(model=lm, tasks=list(task_dict.values()), limit=config.acc_limit,
                                  log_samples=False, random_seed=config.seed, numpy_random_seed=config.seed,
                                  torch_random_seed=config.seed, fewshot_random_seed=config.seed)
    if rank != 0 or results is None:
        return None
    results["data_sources"] = {name: data_source(task) for name, task in task_dict.items()}
    return results


def metric_groups(task_results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's {'acc,none': .., 'acc_stderr,none': ..} -> {'none': {'acc': .., 'acc_stderr': ..}} per filter."""
    groups: dict[str, dict[str, float]] = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        groups.setdefault(filter_name, {})[metric] = float(value)
    return groups


def data_source(task) -> dict:
    """Where a task's documents came from: the local files (with sha256) or the hub dataset name."""
    files = (task.config.dataset_kwargs or {}).get("data_files")
    if task.config.dataset_path == "json" and isinstance(files, dict):
        return {"data_files": {split: {"path": path, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
                               for split, path in files.items()}}
    return {"dataset_path": task.config.dataset_path, "dataset_name": task.config.dataset_name}


def accuracy_records(results: dict, base: dict, config: RunConfig) -> list[dict]:
    """One record per task and metric group (lm-eval filter): the run's config plus the task's metrics."""
    records = []
    for task, task_results in results["results"].items():
        for filter_name, metrics in metric_groups(task_results).items():
            record = dict(base)  # no generation settings: they do not affect the scores
            record.update(
                mode="accuracy", task=task, filter=filter_name, metrics=metrics,
                limit=config.acc_limit, num_samples=results.get("n-samples", {}).get(task, {}).get("effective"),
                num_fewshot=results.get("n-shot", {}).get(task), task_version=results.get("versions", {}).get(task),
                batch_size=config.acc_batch_size, complete=True,
                **results.get("data_sources", {}).get(task, {}),
            )
            records.append(record)
    return records


def scored_line(backend) -> str:
    """The console line naming the module lm-eval scored (a backend may optimize only what generation runs)."""
    if backend.scored_with == backend.name:
        return f"Scored with: the {backend.name} module"
    if backend.scored_with == SCORED_WITH_KERNELS:
        return (f"Scored with: the eager module holding the same weights, its linear layers through the CPU kernels of "
                f"--backend {backend.name}'s decode step, 8 rows at a time (attention and the rest eager)")
    return (f"Scored with: the {backend.scored_with} module holding the same weights (--backend {backend.name} "
            "optimizes only its one-token decode step, which lm-eval's whole-sequence scoring does not run)")


def run_accuracy(config: RunConfig, world=None) -> int:
    """--accuracy-only: prepare the model exactly as --benchmark would, evaluate it, print and record.
    With a `world` of several ranks (llmbench.ranks.World) every rank evaluates its shard in lockstep
    and rank 0 alone prints and records."""
    from lm_eval.utils import make_table

    if config.dummy_weights:
        raise UserError("--dummy-weights are random, so their accuracy means nothing: drop --dummy-weights")
    quiet_lm_eval(config.quiet)
    task_dict = load_tasks(config.acc_tasks, config.acc_data_dir)  # bad names or data fail before the model loads
    run = open_pipeline(config, world)
    backend = run.backend
    if run.loaded.tokenizer is None:
        raise UserError("--accuracy-only needs the model's tokenizer, and this model has none (dummy weights?)")
    model = backend.model if backend.model is not None else run.loaded.model
    backend.prepare_scoring()
    results = evaluate(model, run.loaded.tokenizer, config, rank=world.rank if world else 0, task_dict=task_dict)
    if results is None:
        return 0  # a rank other than 0 of a tensor-parallel run
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    print(scored_line(backend))
    base = run.base_record()
    base["scored_with"] = backend.scored_with
    failed = None
    for record in accuracy_records(results, base, config):
        try:
            append_or_show(config.results, record)
        except UserError as exc:  # each record that cannot be written is still shown on stdout
            failed = failed or exc
    if failed is not None:
        raise failed
    if not config.quiet:
        print(f"Records appended to {config.results}")
    return 0
