"""--dummy-weights: published architectures at their real size, random weights built in place."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, FalconConfig, GlmConfig, GPTJConfig, LlamaConfig, OPTConfig

from llmbench.dummy import INIT_STD, build_random_model, count_parameters, load_dummy_model
from llmbench.errors import UserError
from llmbench.families import builtin_config, builtin_names
from llmbench.main import main
from tests.conftest import ROOT, run_cli
from tests.tiny import save_tiny_model, tiny_llama_config, train_tokenizer

# Parameter counts published by the model cards / papers (see docs/models.md for the sources).
PUBLISHED_PARAMETERS = {
    "meta-llama/Llama-2-7b-hf": 6.74e9,
    "meta-llama/Llama-2-13b-hf": 13.0e9,
    "meta-llama/Llama-2-70b-hf": 69.0e9,
    "meta-llama/Meta-Llama-3-8B": 8.03e9,
    "meta-llama/Meta-Llama-3-70B": 70.6e9,
    "microsoft/Phi-3-mini-128k-instruct": 3.82e9,
    "EleutherAI/gpt-j-6b": 6.05e9,
    "Qwen/Qwen-7B": 7.72e9,
    "facebook/opt-6.7b": 6.66e9,
    "facebook/opt-30b": 30.0e9,
    "bigscience/bloom-7b1": 7.07e9,
    "bigscience/bloom": 176.2e9,
    "THUDM/chatglm3-6b": 6.24e9,
    "baichuan-inc/Baichuan2-13B-Chat": 13.9e9,
}


def test_every_seed_model_id_is_built_in():
    assert set(builtin_names()) == set(PUBLISHED_PARAMETERS)


@pytest.mark.parametrize("model_id", list(PUBLISHED_PARAMETERS))
def test_builtin_configuration_has_the_published_parameter_count(model_id):
    count = count_parameters(builtin_config(model_id))  # meta device: nothing allocated
    assert count == pytest.approx(PUBLISHED_PARAMETERS[model_id], rel=0.01)


def test_builtin_ids_ignore_case():
    assert builtin_config("eleutherai/GPT-J-6B").n_layer == 28


SMALL_CONFIGS = {
    "llama": LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300),
    "gptj": GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=300, n_positions=256),
    "opt": OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
                     word_embed_proj_dim=64),
    "bloom": BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=300),
    "falcon": FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300),
    "glm": GlmConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=300, pad_token_id=0),
}


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_random_model_is_built_in_the_target_dtype_with_the_models_own_buffers(name):
    config = SMALL_CONFIGS[name]
    model = build_random_model(config, torch.device("cpu"), torch.bfloat16)
    reference = AutoModelForCausalLM.from_config(config)  # built the usual way
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in reference.named_parameters()}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for param_name, param in model.named_parameters():
        if param.dim() > 1:
            assert param.float().std().item() == pytest.approx(INIT_STD, rel=0.2), param_name
        else:
            assert torch.all(param == (0 if param_name.endswith("bias") else 1)), param_name
    # Buffers (rotary frequencies, causal masks) come from the model's own constructor, not from the random fill.
    reference_buffers = dict(reference.named_buffers())
    for buffer_name, buffer in model.named_buffers():
        assert torch.allclose(buffer.float(), reference_buffers[buffer_name].float(), rtol=1e-2), buffer_name
    ids = torch.tensor([[5, 6, 7]])
    assert torch.isfinite(model(ids).logits).all()


def test_weights_are_allocated_once_in_the_target_dtype(tmp_path):
    """No float32 copy on the way: peak memory grows by the bfloat16 weights, not by twice or three times that."""
    config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=20, num_attention_heads=16,
                         vocab_size=32000)
    config.save_pretrained(tmp_path)
    script = textwrap.dedent(f"""
        import resource, torch
        from transformers import AutoConfig
        from llmbench.dummy import build_random_model
        config = AutoConfig.from_pretrained({str(tmp_path)!r})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = build_random_model(config, torch.device("cpu"), torch.bfloat16)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(after - before, sum(p.numel() * p.element_size() for p in model.parameters()))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    grown, weights = map(int, proc.stdout.split()[-2:])
    assert weights > 500e6  # ~300 M parameters in bfloat16
    assert grown < 1.5 * weights  # a float32 copy on the way would make it 2x or 3x


def test_dummy_cli_from_a_config_file_uses_synthetic_ids(tmp_path):
    config = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=500,
                       word_embed_proj_dim=64, max_position_embeddings=256)
    config.save_pretrained(tmp_path)
    results = tmp_path / "r.jsonl"
    proc = run_cli("--benchmark", "--dummy-weights", "-m", str(tmp_path / "config.json"), "--greedy",
                   "--input-tokens", "16", "--max-new-tokens", "3", "--num-iter", "1", "--num-warmup", "0",
                   "--results", str(results))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(results.read_text())
    assert record["dummy_weights"] is True and record["model_source"] == "dummy"
    assert record["num_parameters"] == count_parameters(config)
    assert record["prompt_source"] == "synthetic" and record["input_tokens"] == 16
    assert len(record["output_token_ids"]) == 3
    assert "Inference latency" in proc.stdout


def test_dummy_folder_with_a_tokenizer_cuts_real_prompts(tmp_path):
    tokenizer = train_tokenizer()
    folder = save_tiny_model(tmp_path / "m", tiny_llama_config(len(tokenizer)), tokenizer)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()  # a config and a tokenizer, no weights
    results = tmp_path / "r.jsonl"
    rc = main(["--benchmark", "--dummy-weights", "-m", str(folder), "--batch-size", "2", "--num-beams", "4",
               "--input-tokens", "12", "--max-new-tokens", "3", "--num-iter", "1", "--num-warmup", "0", "--quiet",
               "--results", str(results)])
    assert rc == 0
    record = json.loads(results.read_text())
    assert record["dummy_weights"] is True and record["prompt_source"] == "prompt.json:en"
    assert record["num_parameters"] == count_parameters(tiny_llama_config(len(tokenizer)))


def test_loaded_dummy_model_is_marked_and_has_the_configured_size(tmp_path):
    SMALL_CONFIGS["gptj"].save_pretrained(tmp_path)
    loaded = load_dummy_model(str(tmp_path), torch.device("cpu"), torch.float32)
    assert loaded.dummy_weights and loaded.source == "dummy" and loaded.tokenizer is None
    assert loaded.num_parameters == count_parameters(SMALL_CONFIGS["gptj"])


@pytest.mark.parametrize(("argv", "expected"), [
    (["--dummy-weights"], "needs -m"),
    (["--dummy-weights", "-m", "nobody/no-such-model"], "facebook/opt-6.7b"),
    (["--dummy-weights", "-m", "bigscience/bloom", "--device", "cpu", "--dtype", "float32"], "GiB"),
])
def test_dummy_weights_user_errors_are_one_line(argv, expected, capsys, tmp_path):
    assert main(["--benchmark", "--results", str(tmp_path / "r.jsonl"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_folder_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_dummy_model(str(tmp_path), torch.device("cpu"), torch.bfloat16)


def test_a_file_other_than_a_config_is_a_user_error(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(UserError, match="config.json"):
        load_dummy_model(str(gguf), torch.device("cpu"), torch.bfloat16)
