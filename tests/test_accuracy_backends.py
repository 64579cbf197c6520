"""Which module an accuracy run scores, stated in the record and on the console; LLM_ACC_TEST changes nothing."""

import pytest

from llmbench.records import read_records
from tests.test_accuracy import LAMBADA_DIR, acc_args


def test_the_scored_module_is_stated_and_llm_acc_test_changes_nothing(run_main, tmp_path, tiny_llama, monkeypatch):
    common = ("--dtype", "float32", "--acc-data-dir", str(LAMBADA_DIR), "--acc-limit", "4")
    monkeypatch.delenv("LLM_ACC_TEST", raising=False)
    status, eager_out, err = run_main(*acc_args(tiny_llama, tmp_path / "eager.jsonl", *common))
    assert status == 0, err
    monkeypatch.setenv("LLM_ACC_TEST", "1")  # the seed's switch: accepted, and nothing reads it
    status, compile_out, err = run_main(*acc_args(tiny_llama, tmp_path / "compile.jsonl", *common,
                                                  "--backend", "compile"))
    assert status == 0, err
    [eager] = read_records(tmp_path / "eager.jsonl")
    [compiled] = read_records(tmp_path / "compile.jsonl")
    assert (eager["backend"], eager["scored_with"]) == ("eager", "eager")
    assert "Scored with: the eager module\n" in eager_out
    # lm-eval scores whole sequences: the compile backend's weights run through the eager module, whose linear
    # layers run the decode step's CPU kernels (float32 sums in another order: the same figures within rounding)
    assert (compiled["backend"], compiled["scored_with"]) == ("compile", "eager+cpu_kernels")
    assert ("Scored with: the eager module holding the same weights, its linear layers through the CPU kernels of "
            "--backend compile's decode step, 8 rows at a time (attention and the rest eager)") in compile_out
    assert compiled["metrics"].keys() == eager["metrics"].keys()
    for key, value in eager["metrics"].items():
        assert compiled["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_without_the_cpu_kernels_the_eager_module_is_scored(run_main, tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("LLMBENCH_CPU_KERNELS", "0")
    status, out, err = run_main(*acc_args(tiny_llama, tmp_path / "compile.jsonl", "--dtype", "float32",
                                          "--acc-data-dir", str(LAMBADA_DIR), "--acc-limit", "4", "--backend",
                                          "compile"))
    assert status == 0, err
    [compiled] = read_records(tmp_path / "compile.jsonl")
    assert compiled["scored_with"] == "eager"
    assert ("Scored with: the eager module holding the same weights (--backend compile optimizes only its "
            "one-token decode step, which lm-eval's whole-sequence scoring does not run)") in out
