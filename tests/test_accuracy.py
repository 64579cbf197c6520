"""Accuracy mode: lm-eval on the prepared model, offline lambada_openai, and proof that it measures what lm-eval's
own lambada_openai measures."""

import hashlib
import importlib.metadata
from pathlib import Path

import pytest
import yaml

from llmbench.accuracy import shipped_tasks
from llmbench.compat import dtype_kwargs
from llmbench.records import read_records
from tests.conftest import ROOT, error_lines

LAMBADA_DIR = ROOT.parent / "shared" / "data" / "lambada_openai"
LAMBADA_FILE = LAMBADA_DIR / "lambada_test.jsonl"
LAMBADA_SHA256 = "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"  # from the data's README
PROOF_LIMIT = 40  # the first 40 passages: enough to tell models apart, seconds to run
DATA_FIELDS = ("dataset_path", "dataset_name", "dataset_kwargs")


def acc_args(model, results, *extra) -> list[str]:
    args = ["--accuracy-only", "--device", "cpu", "--results", str(results), "--quiet", *extra]
    return args + (["-m", str(model)] if model is not None else [])


@pytest.fixture(scope="module")
def builtin_lambada_openai() -> dict:
    """lm-eval's own lambada_openai definition, as its TaskManager finds it under that name."""
    from lm_eval.tasks import TaskManager

    entry = TaskManager().task_index["lambada_openai"]
    return yaml.safe_load(Path(entry.yaml_path).read_text(encoding="utf-8"))


def test_data_is_the_documented_lambada_copy():
    assert hashlib.sha256(LAMBADA_FILE.read_bytes()).hexdigest() == LAMBADA_SHA256


def test_shipped_task_is_lm_evals_own_apart_from_where_the_data_lives(builtin_lambada_openai):
    shipped = yaml.safe_load(shipped_tasks()["lambada_openai"].read_text(encoding="utf-8"))
    assert {k: v for k, v in shipped.items() if k not in DATA_FIELDS} == \
           {k: v for k, v in builtin_lambada_openai.items() if k not in DATA_FIELDS}
    assert shipped["dataset_path"] == "json" and builtin_lambada_openai["dataset_path"] == "EleutherAI/lambada_openai"


def test_default_model_fp32_matches_lm_evals_own_lambada_openai(cli, tmp_path, builtin_lambada_openai):
    """The project's figure (run_generation.py, model prepared by the pipeline) against lm-eval alone: its own
    task definition pointed at the same passages, and its own HFLM loading the default model's GGUF file."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from llmbench.models import default_gguf_path

    results = tmp_path / "acc.jsonl"
    proc = cli(*acc_args(None, results, "--dtype", "float32", "--acc-data-dir", str(LAMBADA_DIR),
                         "--acc-limit", str(PROOF_LIMIT)))
    assert proc.returncode == 0, proc.stderr
    assert "|lambada_openai|" in proc.stdout  # lm-eval's table
    (record,) = read_records(results)

    reference_task = {**builtin_lambada_openai, "dataset_path": "json", "dataset_name": None,
                      "dataset_kwargs": {"data_files": {"test": str(LAMBADA_FILE)}}}
    gguf = default_gguf_path()
    lm = HFLM(pretrained=str(gguf.parent), gguf_file=gguf.name, dtype="float32", device="cpu", batch_size=1)
    reference = simple_evaluate(model=lm, tasks=[reference_task], limit=PROOF_LIMIT, log_samples=False)
    expected = reference["results"]["lambada_openai"]

    metrics = record["metrics"]
    assert record["num_samples"] == PROOF_LIMIT == reference["n-samples"]["lambada_openai"]["effective"]
    assert metrics["acc"] == expected["acc,none"]
    assert metrics["acc_stderr"] == pytest.approx(expected["acc_stderr,none"], rel=1e-9)
    # float32 sums in another order move perplexity by ~1e-6 relative: on another machine 58.652828 against
    # lm-eval's 58.652592 (the project's weights are safetensors' memory-mapped tensors, 8-byte aligned; lm-eval's,
    # dequantized from the GGUF file, fresh 64-byte aligned ones, and a GEMM may take another path for each); a
    # different task, prompt or dtype moves it by 1e-3 or more
    assert metrics["perplexity"] == pytest.approx(expected["perplexity,none"], rel=1e-5)
    assert 0.1 < metrics["acc"] < 0.9 and 1 < metrics["perplexity"] < 1000  # a real model, not noise


def test_the_converted_default_model_is_keyed_by_the_versions_that_dequantize_it():
    """A conversion cached by other gguf or transformers releases (whose rounding differs in the last bit) is not
    reused: the proof above compares against a fresh dequantization by the installed versions."""
    from llmbench.models import conversion_key, converted_gguf_folder, default_gguf_path

    key = conversion_key(default_gguf_path())
    for name in ("gguf", "transformers", "torch"):
        assert f"|{name}={importlib.metadata.version(name)}" in key
    folder = converted_gguf_folder(default_gguf_path(), quiet=True)
    assert folder.name.endswith("-" + hashlib.sha256(key.encode()).hexdigest()[:12])
    assert (folder / "config.json").is_file()


def test_tiny_llama_slice_writes_an_accuracy_record(cli, tmp_path, tiny_llama):
    results = tmp_path / "acc.jsonl"
    proc = cli(*acc_args(tiny_llama, results, "--dtype", "float32", "--acc-data-dir", str(LAMBADA_DIR),
                         "--acc-iter", "6", "--acc-batch-size", "3"))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    (record,) = read_records(results)
    assert record["mode"] == "accuracy" and record["task"] == "lambada_openai" and record["filter"] == "none"
    assert record["model"] == str(tiny_llama) and record["dtype"] == "float32" and record["backend"] == "eager"
    assert record["limit"] == 6 and record["num_samples"] == 6 and record["num_fewshot"] == 0
    assert record["batch_size"] == 3 and record["complete"] is True
    assert set(record["metrics"]) == {"acc", "acc_stderr", "perplexity", "perplexity_stderr"}
    assert 0 <= record["metrics"]["acc"] <= 1 and record["metrics"]["perplexity"] > 1
    (source,) = record["data_files"].values()
    assert Path(source["path"]) == LAMBADA_FILE.resolve() and source["sha256"] == LAMBADA_SHA256
    assert "environment" in record and "max_new_tokens" not in record  # generation settings do not apply


def test_evaluate_can_be_called_on_a_model_object(tiny_llama):
    """The entry other runs (e.g. one per tensor-parallel rank) reuse: a module and tokenizer in, lm-eval results
    out on rank 0 only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmbench.accuracy import evaluate
    from llmbench.cli import parse_config

    config = parse_config(["--accuracy-only", "--quiet", "--acc-data-dir", str(LAMBADA_DIR), "--acc-limit", "2"])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, **dtype_kwargs(torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    results = evaluate(model, tokenizer, config)
    assert results["n-samples"]["lambada_openai"]["effective"] == 2
    assert evaluate(model, tokenizer, config, rank=1) is None


def bad_inputs(tmp_path: Path) -> dict:
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "unknown task": (["--acc-tasks", "lambada_opnai", "--acc-data-dir", str(LAMBADA_DIR)],
                         "unknown lm-eval task 'lambada_opnai' (did you mean lambada_openai"),
        "missing data folder": (["--acc-data-dir", str(tmp_path / "nowhere")], "no such folder"),
        "folder without the data": (["--acc-data-dir", str(empty)], "has no lambada_test.jsonl"),
        "empty task list": (["--acc-tasks", ","], "--acc-tasks is empty"),
        "both modes": (["--benchmark"], "two different runs"),
        "random weights": (["--dummy-weights", "--acc-data-dir", str(LAMBADA_DIR)], "drop --dummy-weights"),
    }


def test_bad_input_is_one_line(run_main, tmp_path):
    for case, (args, message) in bad_inputs(tmp_path).items():
        status, _, err = run_main(*acc_args(None, tmp_path / "r.jsonl", *args))
        lines = error_lines(err)
        assert status == 2, case
        assert len(lines) == 1 and message in lines[0], (case, err)
    assert not (tmp_path / "r.jsonl").exists()


def test_hub_task_unreachable_offline_asks_for_the_data_folder(cli, tmp_path):
    """lambada_openai without --acc-data-dir is lm-eval's built-in task, whose data is on the hub."""
    proc = cli(*acc_args(None, tmp_path / "r.jsonl"), env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "cannot load its dataset" in lines[0] and "--acc-data-dir" in lines[0], proc.stderr
    assert not (tmp_path / "r.jsonl").exists()
