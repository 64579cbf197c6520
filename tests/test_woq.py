"""Weight-only quantization: quantize, save, reload and generate the same tokens; bad input is one line."""

import json
import os
import pickle
import sys

import pytest
import torch

from llmbench import quantize
from llmbench.main import main
from llmbench.models import weight_bytes

RUN = ("--benchmark", "--greedy", "--input-tokens", "16", "--max-new-tokens", "8", "--num-iter", "1",
       "--num-warmup", "0", "--token-latency", "--quiet")


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def refuse_to_quantize(*args, **kwargs):
    raise AssertionError("quantized again instead of loading the checkpoint")


def inner_tensors(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors a (possibly quantized) tensor is made of: packed weights, scales, zero points."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return {"": tensor.detach()}
    names, _ = tensor.__tensor_flatten__()
    return {f"{name}.{key}".strip("."): t for name in names
            for key, t in inner_tensors(getattr(tensor, name)).items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


class RunsCode:
    """Pickles as a call of os.system: what a crafted checkpoint holds."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("scheme, group_size, layout, quantized, skipped", [
    ("int8", None, "Int8Tensor", 15, []),
    # The CPU int4 packing needs output sizes divisible by 16: the 600-token lm_head stays bf16, and says so.
    ("int4", "32", "Int4OpaqueTensor", 14, ["lm_head"]),
])
def test_quantize_save_reload_same_tokens(tiny_llama, tmp_path, monkeypatch, scheme, group_size, layout, quantized,
                                         skipped):
    checkpoint, results = tmp_path / "ckpt", tmp_path / "r.jsonl"
    args = [*RUN, "-m", str(tiny_llama), "--woq", scheme, "--woq-checkpoint", str(checkpoint), "--results",
            str(results), *(["--woq-group-size", group_size] if group_size else [])]
    assert main(args) == 0
    assert (checkpoint / "woq_settings.json").is_file() and (checkpoint / "quantized_state_dict.pt").is_file()
    monkeypatch.setattr(quantize, "quantize_in_place", refuse_to_quantize)
    assert main(args) == 0  # the checkpoint exists now: loaded, not quantized again (that would fail)
    made, reloaded = records(results)
    assert reloaded["output_token_ids"] == made["output_token_ids"]
    assert len(made["output_token_ids"]) == 8
    for record in (made, reloaded):
        q = record["quantization"]
        assert q["scheme"] == scheme and q["algo"] == "rtn" and q["layout"] == layout
        assert q["group_size"] == (int(group_size) if group_size else None)
        assert q["library"].startswith("torchao ")
        assert q["quantized_layers"] == quantized and q["skipped_layers"] == skipped
        assert q["checkpoint"] == str(checkpoint)
    assert reloaded["weight_bytes"] == made["weight_bytes"]


def test_int4_reload_holds_the_saved_packed_tensors_bit_for_bit(tiny_llama, tmp_path, monkeypatch):
    from llmbench.cli import parse_config
    from llmbench.models import load_model

    checkpoint, cpu = tmp_path / "ckpt", torch.device("cpu")
    config = parse_config(["--woq", "int4", "--woq-checkpoint", str(checkpoint), "--quiet"])
    made = load_model(str(tiny_llama), cpu, torch.bfloat16)
    quantize.quantize_model(made, config, cpu, torch.bfloat16)
    with torch.serialization.safe_globals(quantize.checkpoint_tensor_classes()):
        saved = torch.load(checkpoint / quantize.WEIGHTS_FILE, weights_only=True)
    monkeypatch.setattr(quantize, "quantize_in_place", refuse_to_quantize)
    reloaded = load_model(str(tiny_llama), cpu, torch.bfloat16)
    settings = quantize.quantize_model(reloaded, config, cpu, torch.bfloat16)
    assert settings["layout"] == "Int4OpaqueTensor" and settings["quantized_layers"] == 14
    state = reloaded.model.state_dict()
    assert state.keys() == saved.keys()
    packed = 0
    for name, tensor in saved.items():
        assert type(state[name]) is type(tensor), name
        mine, theirs = inner_tensors(state[name]), inner_tensors(tensor)
        assert mine.keys() == theirs.keys() and all(same_bits(mine[k], theirs[k]) for k in theirs), name
        packed += type(tensor).__name__ == "Int4OpaqueTensor"
    assert packed == 14


def crafted_checkpoint(tiny_llama, tmp_path, contents: str) -> tuple[list[str], "object"]:
    """A checkpoint folder with valid settings whose weights file is replaced: -> (run args, marker path)."""
    checkpoint, marker = tmp_path / "ckpt", tmp_path / "code-ran"
    args = [*RUN, "-m", str(tiny_llama), "--results", str(tmp_path / "r.jsonl"), "--woq", "int8",
            "--woq-checkpoint", str(checkpoint)]
    assert main(args) == 0
    weights = checkpoint / quantize.WEIGHTS_FILE
    if contents == "torch.save":
        torch.save({"model.embed_tokens.weight": RunsCode(f"touch {marker}")}, weights)
    elif contents == "pickle":
        weights.write_bytes(pickle.dumps({"w": RunsCode(f"touch {marker}")}, protocol=4))
    else:
        weights.write_bytes(os.urandom(4096))
    return args, marker


@pytest.mark.parametrize("contents, message", [
    ("torch.save", "names posix.system, which is not a tensor type, so it was not loaded"),
    ("pickle", "is not a checkpoint of tensors"),
    ("random bytes", "corrupt"),
])
def test_a_crafted_or_corrupt_checkpoint_never_runs_code_and_is_one_line(tiny_llama, tmp_path, capsys, contents,
                                                                           message):
    args, marker = crafted_checkpoint(tiny_llama, tmp_path, contents)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err
    assert not marker.exists()


def test_trusting_the_pickle_is_an_explicit_choice(tiny_llama, tmp_path, capsys):
    args, marker = crafted_checkpoint(tiny_llama, tmp_path, "torch.save")
    capsys.readouterr()
    # Opted in, the pickle runs as it would with any torch.load(weights_only=False); its state then fits no model.
    assert main([*args, "--trust-checkpoint-pickle"]) == 2
    assert marker.exists()
    err = capsys.readouterr().err.strip()
    assert "does not fit this model" in err and "\n" not in err
    assert main([*RUN, "--trust-checkpoint-pickle"]) == 2
    assert "--trust-checkpoint-pickle applies to --woq-checkpoint" in capsys.readouterr().err


def test_int4_weight_bytes_count_packed_weights(tiny_llama):
    """4 bits per weight plus a bf16 scale and zero per group of 32, against the bf16 model's 16 bits."""
    from llmbench.cli import parse_config
    from llmbench.models import load_model
    from llmbench.quantize import quantize_model

    loaded = load_model(str(tiny_llama), torch.device("cpu"), torch.bfloat16)
    layers = [m for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    before = weight_bytes(loaded.model)
    quantize_model(loaded, parse_config(["--woq", "int4", "--woq-group-size", "32"]), torch.device("cpu"),
                   torch.bfloat16)
    dense = sum(m.in_features * m.out_features for m in layers)
    packed = dense // 2 + dense // 32 * 2 * 2
    assert weight_bytes(loaded.model) == before - 2 * dense + packed


def test_awq_calibrates_on_a_local_file(tiny_llama, tmp_path):
    from llmbench.cli import parse_config
    from llmbench.models import load_model
    from llmbench.quantize import quantize_model

    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"Passage {i} tells of rivers, hills and old towns."}) + "\n"
                             for i in range(4)))
    loaded = load_model(str(tiny_llama), torch.device("cpu"), torch.bfloat16)
    config = parse_config(["--woq", "int4", "--woq-algo", "awq", "--calib-dataset", str(calib), "--quiet"])
    settings = quantize_model(loaded, config, torch.device("cpu"), torch.bfloat16)
    assert settings["algo"] == "awq" and settings["quantized_layers"] == 14
    # AWQ's per-channel activation scales ride along with each quantized weight.
    assert loaded.model.model.layers[0].mlp.down_proj.weight.act_pre_scale is not None
    ids = loaded.tokenizer("rivers and hills", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.isfinite(loaded.model(ids).logits).all()


@pytest.mark.parametrize("extra, message", [
    (["--woq", "int4", "--woq-group-size", "128"], "does not divide the input size 64 of layer"),
    (["--woq", "int4", "--woq-group-size", "48"], "int4 kernels take 32, 64, 128, 256"),
    (["--woq", "int8", "--woq-algo", "awq"], "--woq-algo awq calibrates on sample text: pass --calib-dataset"),
    (["--woq", "int8", "--woq-algo", "gptq", "--calib-dataset", "no-such-dataset-here"], "not a loadable dataset"),
    (["--woq", "int8", "--woq-algo", "gptq", "--calib-dataset", "CALIB"], "torchao's GPTQ runs on CUDA only"),
])
def test_bad_input_is_one_line(tiny_llama, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a dataset name is looked up in the local cache only
    calib = tmp_path / "calib.txt"
    calib.write_text("Some calibration text.\n\nAnd another passage.\n")
    extra = [str(calib) if arg == "CALIB" else arg for arg in extra]
    code = main([*RUN, "-m", str(tiny_llama), "--results", str(tmp_path / "r.jsonl"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and "\n" not in err and "Traceback" not in err


def test_woq_without_torchao_is_one_line(tiny_llama, tmp_path, capsys, monkeypatch):
    """The IPEX environment has no torchao: --woq without --ipex says what to do instead."""
    monkeypatch.setitem(sys.modules, "torchao", None)  # what find_spec reports for a package that is not installed
    code = main([*RUN, "-m", str(tiny_llama), "--results", str(tmp_path / "r.jsonl"), "--woq", "int8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "quantizes with torchao, which is not installed here: add --ipex" in err


def test_checkpoint_mismatch_and_foreign_folder_are_one_line(tiny_llama, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    base = [*RUN, "-m", str(tiny_llama), "--results", str(tmp_path / "r.jsonl"), "--woq-checkpoint", str(checkpoint)]
    assert main([*base, "--woq", "int8"]) == 0
    capsys.readouterr()
    assert main([*base, "--woq", "int4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was made with other settings: scheme 'int8' (this run: 'int4')" in err and "\n" not in err
    foreign = tmp_path / "empty"
    foreign.mkdir()
    assert main([*RUN, "-m", str(tiny_llama), "--results", str(tmp_path / "r.jsonl"), "--woq", "int8",
                 "--woq-checkpoint", str(foreign)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a quantized checkpoint" in err and "\n" not in err


def test_torchao_quantized_folder_loads_through_transformers(tiny_llama, tmp_path, capsys):
    """A transformers folder quantized with TorchAoConfig runs as it is; asking to quantize it again is refused."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig

    folder = tmp_path / "prequantized"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    results = tmp_path / "r.jsonl"
    assert main([*RUN, "-m", str(folder), "--results", str(results)]) == 0
    record = records(results)[0]
    assert len(record["output_token_ids"]) == 8
    assert record["quantization"]["library"] == "torchao"  # the checkpoint's own quantization is recorded
    capsys.readouterr()
    assert main([*RUN, "-m", str(folder), "--results", str(results), "--woq", "int4"]) == 2
    assert "is already quantized (torchao); drop --woq" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [
    ["--num-beams", "2", "--batch-size", "2"],
    ["--backend", "compile"],
])
def test_int4_runs_with_beams_batches_and_compile(tiny_llama, tmp_path, monkeypatch, extra):
    monkeypatch.setenv("LLMBENCH_COMPILE_MODE", "default")  # compiles several times faster than max-autotune
    results = tmp_path / "r.jsonl"
    args = [a for a in RUN if a != "--greedy" or "--num-beams" not in extra]
    assert main([*args, "-m", str(tiny_llama), "--woq", "int4", "--results", str(results), *extra]) == 0
    record = records(results)[0]
    assert len(record["output_token_ids"]) == 8 and record["complete"]
    assert record["quantization"]["layout"] == "Int4OpaqueTensor"
    assert record["backend"] == ("compile" if "compile" in extra else "eager")
