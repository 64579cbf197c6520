"""--woq-algo autoround: AutoRound calibrates INT4 on cpu, writes a standard checkpoint, and later runs load it."""

import json

from tests.conftest import error_lines

COMMON = ("--benchmark", "--greedy", "--dtype", "float32", "--input-tokens", "16", "--max-new-tokens", "8",
          "--num-iter", "1", "--num-warmup", "0", "--device", "cpu")


def test_autoround_calibrates_saves_and_reloads(run_main, tiny_llama, tmp_path):
    ckpt, results = tmp_path / "ar", tmp_path / "r.jsonl"
    flags = (*COMMON, "-m", str(tiny_llama), "--woq", "int4", "--woq-algo", "autoround", "--calib-dataset",
             "prompt.json", "--calib-iters", "2", "--woq-checkpoint", str(ckpt), "--results", str(results))
    status, _, err = run_main(*flags)
    assert status == 0, err[-3000:]
    assert "calibrating with AutoRound" in err
    saved = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert (saved["quant_method"], saved["bits"], saved["group_size"], saved["iters"]) == ("auto-round", 4, 32, 2)
    assert "gptq" in saved["packing_format"]
    status, _, err = run_main(*flags)  # the folder exists now: loaded, not calibrated again
    assert status == 0, err[-3000:]
    assert "calibrating with AutoRound" not in err
    first, second = [json.loads(line) for line in results.read_text().splitlines()]
    for record in (first, second):
        q = record["quantization"]
        assert q["library"].startswith("auto-round ") and q["algo"] == "autoround"
        assert q["quantized_layers"] == 14 and q["skipped_layers"] == ["lm_head"]  # 2 layers x 7; the head stays
    assert first["output_token_ids"] == second["output_token_ids"]
    # packed INT4 buffers are counted in weight_bytes: below the float32 model's bytes
    assert second["weight_bytes"] < first["num_parameters"] * 4


def test_autoround_without_calibration_text_is_one_line(run_main, tiny_llama, tmp_path):
    status, _, err = run_main(*COMMON, "-m", str(tiny_llama), "--woq", "int4", "--woq-algo", "autoround",
                              "--woq-checkpoint", str(tmp_path / "ar"), "--results", str(tmp_path / "r.jsonl"))
    assert status == 2
    [line] = error_lines(err)
    assert "--calib-dataset" in line
    assert not (tmp_path / "ar").exists()
