"""Which module an accuracy run scores, stated in the record and on the console; LLM_ACC_TEST changes nothing."""

from llmbench.results import read_records
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
    # lm-eval scores whole sequences: the compile backend's weights run through the eager module
    assert (compiled["backend"], compiled["scored_with"]) == ("compile", "eager")
    assert compiled["metrics"] == eager["metrics"]
    assert "Scored with: the eager module\n" in eager_out
    assert ("Scored with: the eager module holding the same weights (--backend compile optimizes only its "
            "one-token decode step, which lm-eval's whole-sequence scoring does not run)") in compile_out
