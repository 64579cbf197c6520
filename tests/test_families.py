"""Every model family runs through the benchmark CLI path; remote code runs only when the user opts in."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmbench.backends import cpu_kernels
from llmbench.compat import dtype_kwargs
from llmbench.main import main
from llmbench.prompts import DEFAULT_PROMPT_FILE, cut_prompt, load_prompt_text
from tests.conftest import run_cli
from tests.tiny import FAMILIES, save_tiny_family, save_tiny_model, tiny_llama_config, train_tokenizer

INPUT_TOKENS, NEW_TOKENS, BATCH = 8, 4, 3


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory) -> dict[str, Path]:
    return {family: save_tiny_family(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


def bench(folder: Path, results: Path, *extra: str) -> int:
    return main(["--benchmark", "-m", str(folder), "--batch-size", str(BATCH), "--input-tokens", str(INPUT_TOKENS),
                 "--max-new-tokens", str(NEW_TOKENS), "--num-iter", "1", "--num-warmup", "0", "--dtype", "float32",
                 "--quiet", "--results", str(results), *extra], prog="run_generation.py")


def reference_generate(folder: Path, num_beams: int) -> list[int]:
    """What transformers itself generates for the same prompt, without the suite."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, **dtype_kwargs(torch.float32)).eval()
    ids = tokenizer(load_prompt_text()[0])["input_ids"][:INPUT_TOKENS]
    input_ids = torch.tensor([ids] * BATCH)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, num_beams=num_beams, do_sample=False, pad_token_id=3)
    return out[0, INPUT_TOKENS:].tolist()


@pytest.mark.parametrize("backend", ["eager", "compile"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_benchmarks_with_greedy_and_beam_search(family, backend, family_folders, tmp_path, capsys):
    folder, results = family_folders[family], tmp_path / "results.jsonl"
    if backend == "compile":
        # one process compiles every family's steps here: dynamo's recompile limit is per compiled function
        torch._dynamo.reset()
    rc = bench(folder, results, "--greedy", "--backend", backend)
    if rc and backend == "compile" and int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4.x: some families' code cannot run on a static cache (GPT-2, Mixtral, multi-query Falcon,
        # Bloom's ALiBi mask): those fail in one line that points to eager
        assert rc == 2 and "--backend eager" in capsys.readouterr().err
        return
    assert rc == 0
    assert bench(folder, results, "--num-beams", "4", "--backend", backend) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["num_beams"] for r in records] == [1, 4]
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    assert model_type == FAMILIES[family][0]
    for record, beams in zip(records, (1, 4)):
        assert record["complete"] and not record["dummy_weights"]
        assert record["batch_size"] == BATCH and record["input_tokens"] == INPUT_TOKENS
        assert record["prompt_source"] == "prompt.json:en"
        assert record["num_parameters"] > 0
        assert record["output_token_ids"] == reference_generate(folder, beams)
        if family == "bloom" and backend == "compile" and cpu_kernels.attention_vectorized():
            # its ALiBi attention, written in Bloom's own module, in the kernel as a per-head mask
            assert "ALiBi" in record["backend_details"]["decode_attention"]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("text_key", ["en", "zh"])
def test_family_tokenizer_cuts_exact_prompts(family, text_key, family_folders, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(family_folders[family])
    wanted = FAMILIES[family][1].removesuffix("Fast")
    # transformers 5 loads a generic tokenizer.json as TokenizersBackend when the class would rebuild it differently
    assert type(tokenizer).__name__.removesuffix("Fast") in (wanted, "TokenizersBackend", "PreTrainedTokenizer")
    data = json.loads(DEFAULT_PROMPT_FILE.read_text(encoding="utf-8"))
    prompt_file = tmp_path / "prompt.json"
    prompt_file.write_text(json.dumps({**data, "default_text": text_key}), encoding="utf-8")
    text = data["texts"][text_key]
    for n in (1, 31, 1024, 4096):
        inputs = cut_prompt(tokenizer, n, 2, torch.device("cpu"), prompt_file)
        assert inputs.input_ids.shape == (2, n)
        assert inputs.source == f"prompt.json:{text_key}"
    decoded = tokenizer.decode(inputs.input_ids[0], skip_special_tokens=True).strip()
    assert text.startswith(decoded[:200])


LAMBADA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "lambada_openai"


# An accuracy run costs 10-30 s here (lm-eval indexes its whole task catalogue each time), so two families stand
# for the rest: Bloom (ALiBi, no position limit) and GLM (ChatGLM3's shapes, rotary on half of each head).
@pytest.mark.parametrize("family", ["bloom", "glm"])
def test_family_runs_through_the_accuracy_path(family, family_folders, tmp_path):
    results = tmp_path / "acc.jsonl"
    rc = main(["--accuracy-only", "-m", str(family_folders[family]), "--acc-tasks", "lambada_openai",
               "--acc-data-dir", str(LAMBADA_DIR), "--acc-limit", "2", "--dtype", "float32", "--quiet",
               "--results", str(results)], prog="run_generation.py")
    assert rc == 0
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["task"] == "lambada_openai" and record["num_samples"] == 2
    assert 0.0 <= record["metrics"]["acc"] <= 1.0 and record["metrics"]["perplexity"] > 1.0


# A checkpoint whose architecture lives in its own Python files, as Qwen-7B, ChatGLM3 and Baichuan2 do.
REMOTE_CONFIG_CODE = '''
from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tinyremote"
'''
REMOTE_MODELING_CODE = '''
from transformers import LlamaForCausalLM

from .configuration_tinyremote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''


def make_remote_code_folder(folder: Path, auto_map: dict | None = None, with_code: bool = True) -> Path:
    tokenizer = train_tokenizer()
    save_tiny_model(folder, tiny_llama_config(len(tokenizer)), tokenizer)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tinyremote", architectures=["TinyRemoteForCausalLM"], auto_map=auto_map or {
        "AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if with_code:
        (folder / "configuration_tinyremote.py").write_text(REMOTE_CONFIG_CODE)
        (folder / "modeling_tinyremote.py").write_text(REMOTE_MODELING_CODE)
    return folder


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_remote_code_runs_with_trust_remote_code(tmp_path):
    folder = make_remote_code_folder(tmp_path / "remote")
    results = tmp_path / "r.jsonl"
    proc = run_cli("--benchmark", "-m", str(folder), "--trust-remote-code", "--greedy", "--input-tokens", "8",
                   "--max-new-tokens", "4", "--num-iter", "1", "--num-warmup", "0", "--quiet", "--results",
                   str(results), env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert proc.returncode == 0, proc.stderr
    record = json.loads(results.read_text())
    assert len(record["output_token_ids"]) == 4
    assert any((tmp_path / "modules").rglob("modeling_tinyremote.py"))  # the checkpoint's own code was loaded


@pytest.mark.parametrize("dummy", [False, True])
def test_remote_code_without_the_flag_is_one_line(tmp_path, capsys, dummy):
    folder = make_remote_code_folder(tmp_path / "remote")
    capsys.readouterr()  # only the run's own output counts
    assert bench(folder, tmp_path / "r.jsonl", "--greedy", *(["--dummy-weights"] if dummy else [])) == 2
    err = one_line_error(capsys)
    assert str(folder) in err and "--trust-remote-code" in err and "tinyremote" in err


def test_remote_code_with_missing_files_is_one_line(tmp_path, capsys):
    folder = make_remote_code_folder(tmp_path / "remote", with_code=False)
    capsys.readouterr()
    assert bench(folder, tmp_path / "r.jsonl", "--greedy", "--trust-remote-code") == 2
    err = one_line_error(capsys)
    assert "configuration_tinyremote.py" in err and "copy" in err


def test_remote_code_from_a_hub_repository_is_one_line(tmp_path, capsys):
    folder = make_remote_code_folder(tmp_path / "remote", auto_map={
        "AutoConfig": "someorg/somerepo--configuration_tinyremote.TinyRemoteConfig",
        "AutoModelForCausalLM": "someorg/somerepo--modeling_tinyremote.TinyRemoteForCausalLM"})
    capsys.readouterr()
    assert bench(folder, tmp_path / "r.jsonl", "--greedy", "--trust-remote-code") == 2
    err = one_line_error(capsys)
    assert "someorg/somerepo" in err and "offline" in err


def test_remote_tokenizer_code_missing_is_one_line(tmp_path, capsys):
    folder = make_remote_code_folder(tmp_path / "remote")
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": ["tokenization_tinyremote.TinyRemoteTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    capsys.readouterr()
    assert bench(folder, tmp_path / "r.jsonl", "--greedy", "--trust-remote-code") == 2
    err = one_line_error(capsys)
    assert "tokenization_tinyremote.py" in err and "tokenizer_config.json" in err
