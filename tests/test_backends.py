"""The optimization backends against eager on a tiny Llama: equal greedy and beam ids in fp32, bounded bf16 drift,
one-line errors when IPEX is missing, and an opt-in run of IPEX itself (LLMBENCH_IPEX_TESTS=1, see docs/backends.md)."""

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from llmbench.backends import get_backend, kernel_linears
from llmbench.models import load_model
from llmbench.prompts import cut_prompt
from llmbench.timing import StepTimer
from tests.compiled_steps import teacher_forced_log_probs

CPU = torch.device("cpu")
INPUT_TOKENS, NEW_TOKENS = 16, 24


def ipex_installed() -> bool:
    try:
        metadata.version("intel-extension-for-pytorch")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def inductor_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("inductor")


@pytest.fixture
def compile_env(inductor_dir, monkeypatch):
    """A cache folder of the test's own (cold, so the test covers compiling), set as a user would."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_dir))
    return inductor_dir


def run_backend(name, model, inputs, num_beams, timer=None):
    backend = get_backend(name)
    backend.prepare(model, CPU, next(model.parameters()).dtype, None)
    backend.warm_up_shapes(inputs, NEW_TOKENS, num_beams)
    return backend, backend.generate(inputs, NEW_TOKENS, num_beams, timer)


def test_compile_greedy_equals_eager_in_fp32(tiny_llama, compile_env):
    loaded = load_model(str(tiny_llama), CPU, torch.float32)
    inputs = cut_prompt(loaded.tokenizer, INPUT_TOKENS, 2, CPU)  # batch 2
    _, eager_ids = run_backend("eager", loaded.model, inputs, 1)
    timer = StepTimer(CPU)
    timer.start()
    backend, compiled_ids = run_backend("compile", loaded.model, inputs, 1, timer)
    timing = timer.stop(NEW_TOKENS)
    assert compiled_ids.shape == (2, INPUT_TOKENS + NEW_TOKENS)
    assert torch.equal(compiled_ids, eager_ids)
    assert len(timing.token_latencies_s) == NEW_TOKENS  # one step() per generated token
    compile_s = backend.details["compile_time_s"][f"batch2_beams1_in{INPUT_TOKENS}_new{NEW_TOKENS}"]
    assert compile_s > 0
    assert backend.details["inductor_cache_dir"] == str(compile_env)
    again = backend.generate(inputs, NEW_TOKENS, 1)  # the reused cache is reset between runs
    assert torch.equal(again, eager_ids)
    # once warmed up, the prompt's pass and the steps called their compiled graphs directly (ids above included)
    length = INPUT_TOKENS + NEW_TOKENS
    assert backend.details["prefill"].startswith("compiled up to 64 rows")
    assert backend.details["direct_steps"] == {f"greedy prompt, 2 rows, cache of {length}": True,
                                               f"greedy, 2 rows, cache of {length}": True}


@pytest.mark.parametrize("cpu_kernels", ["1", "0"])  # the cache reorder and beams' pick by C++ ops, and by aten ops
def test_compile_beam_search_equals_eager_in_fp32(tiny_llama, compile_env, monkeypatch, cpu_kernels):
    monkeypatch.setenv("LLMBENCH_COMPILE_MODE", "default")  # the loop is under test here; compile it quickly
    monkeypatch.setenv("LLMBENCH_CPU_KERNELS", cpu_kernels)
    loaded = load_model(str(tiny_llama), CPU, torch.float32)
    inputs = cut_prompt(loaded.tokenizer, INPUT_TOKENS, 1, CPU)
    _, eager_ids = run_backend("eager", loaded.model, inputs, 4)
    prefill_rows = []  # the rows of every eager forward pass

    def note_rows(module, args, out):
        if not torch.compiler.is_compiling():
            prefill_rows.append(tuple(args[0].shape))

    hook = loaded.model.get_input_embeddings().register_forward_hook(note_rows)
    backend, compiled_ids = run_backend("compile", loaded.model, inputs, 4)
    hook.remove()
    assert torch.equal(compiled_ids, eager_ids)
    # the prompt ran once per prompt (1 row), not once per beam: eagerly into its new cache in the warm-up, then
    # compiled (the second warm-up generation and the measured one)
    assert prefill_rows == [(1, INPUT_TOKENS)]
    assert backend.details["beam_prefill"].startswith("one row per prompt")
    assert backend.details["beam_cache_reorder"].startswith("llmbench_cpu" if cpu_kernels == "1" else "index_select")
    assert backend.details["beam_candidates"].startswith("llmbench_cpu.beam_choose" if cpu_kernels == "1"
                                                         else "torch.topk")
    assert backend.details["direct_steps"] == {f"beam prompt, 1 rows, cache of {INPUT_TOKENS}": True,
                                               f"beam, 4 rows, cache of {INPUT_TOKENS + NEW_TOKENS}": True}


def test_compile_bf16_log_probs_stay_as_close_to_fp32_as_eager_bf16(tiny_llama, compile_env):
    """bf16 changes the numbers: the compiled step may drift from fp32 no more than eager bf16 does (and little)."""
    reference = load_model(str(tiny_llama), CPU, torch.float32)
    inputs = cut_prompt(reference.tokenizer, INPUT_TOKENS, 1, CPU)
    _, ids = run_backend("eager", reference.model, inputs, 1)
    continuation = ids[:, INPUT_TOKENS:]
    eos = reference.model.config.eos_token_id

    def eager_log_probs(model):
        with torch.inference_mode():
            logits = model(input_ids=ids[:, :-1]).logits[:, INPUT_TOKENS - 1:].float()
        return torch.log_softmax(logits, dim=-1)

    fp32 = eager_log_probs(reference.model)
    bf16 = load_model(str(tiny_llama), CPU, torch.bfloat16)
    eager_bf16 = eager_log_probs(bf16.model)
    backend = get_backend("compile")
    backend.prepare(bf16.model, CPU, torch.bfloat16, None)
    # the prompt through the kernels' vdpbf16ps where oneDNN's bf16 GEMM has no AMX (family 26 EPYC: 26 -> 17 ms)
    assert ("bfloat16 prompts" in backend.details.get("native_prefill", "")) == (
        "bfloat16" in kernel_linears.native_prompt_kinds())
    compiled_bf16 = teacher_forced_log_probs(backend, inputs.input_ids, continuation)
    keep = torch.ones(fp32.shape[-1], dtype=torch.bool)
    keep[eos] = False  # generation forbids EOS; its log-prob is -inf on the compiled path
    eager_error = (eager_bf16 - fp32)[..., keep].abs().max().item()
    compiled_error = (compiled_bf16 - fp32)[..., keep].abs().max().item()
    assert compiled_bf16.shape == fp32.shape
    assert torch.isneginf(compiled_bf16[..., eos]).all()
    assert torch.isfinite(compiled_bf16[..., keep]).all()
    assert compiled_error < 0.05
    assert compiled_error <= 2 * eager_error + 1e-3


def test_compile_cli_run_records_compile_time_apart(tiny_llama, cli, tmp_path, compile_env):
    results = tmp_path / "r.jsonl"
    proc = cli("--benchmark", "-m", str(tiny_llama), "--backend", "compile", "--dtype", "float32", "--greedy",
               "--batch-size", "2", "--input-tokens", str(INPUT_TOKENS), "--max-new-tokens", str(NEW_TOKENS),
               "--num-iter", "2", "--num-warmup", "1", "--token-latency", "--quiet", "--results", str(results),
               "--device", "cpu",
               # the record is under test here, not the kernels: the quick mode keeps the subprocess short
               env={"TORCHINDUCTOR_CACHE_DIR": str(compile_env), "LLMBENCH_COMPILE_MODE": "default"})
    assert proc.returncode == 0, proc.stderr
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["backend"] == "compile"
    assert record["complete"] is True
    details = record["backend_details"]
    assert list(details["compile_time_s"]) == [f"batch2_beams1_in{INPUT_TOKENS}_new{NEW_TOKENS}"]
    assert details["compile_mode"] == "default"
    assert record["metrics"]["next_token_latency_s"] > 0
    assert "Average 2... latency" in proc.stdout


@pytest.mark.skipif(ipex_installed(), reason="IPEX is installed here: the missing-IPEX message cannot be shown")
@pytest.mark.parametrize("flags", [("--ipex",), ("--backend", "ipex")])
def test_ipex_without_ipex_is_one_actionable_line(tiny_llama, cli, tmp_path, flags):
    proc = cli("--benchmark", "-m", str(tiny_llama), *flags, "--greedy", "--num-iter", "1", "--num-warmup", "0",
               "--device", "cpu", "--results", str(tmp_path / "r.jsonl"))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]  # (loading bars aside)
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "bash setup.sh --ipex" in errors[0]
    assert not (tmp_path / "r.jsonl").exists()


# Opt-in: collected only with LLMBENCH_IPEX_TESTS=1, in the IPEX virtual environment (requirements-ipex.txt;
# see docs/backends.md); elsewhere tests/conftest.py deselects them.
IPEX_OPT_IN = pytest.mark.ipex


@IPEX_OPT_IN
@pytest.mark.parametrize("num_beams", [1, 4])
def test_ipex_equals_eager_in_fp32(tiny_llama, num_beams):
    reference = load_model(str(tiny_llama), CPU, torch.float32)
    inputs = cut_prompt(reference.tokenizer, INPUT_TOKENS, 2, CPU)
    _, eager_ids = run_backend("eager", reference.model, inputs, num_beams)
    optimized = load_model(str(tiny_llama), CPU, torch.float32)
    timer = StepTimer(CPU)
    timer.start()
    backend, ipex_ids = run_backend("ipex", optimized.model, inputs, num_beams, timer)
    assert len(timer.stop(NEW_TOKENS).token_latencies_s) == NEW_TOKENS
    assert backend.details["ipex_api"] in ("ipex.llm.optimize", "ipex.optimize_transformers")
    assert torch.equal(ipex_ids, eager_ids)


def test_the_inductor_cache_is_kept_per_cpu_kind_and_vector_isa(tmp_path):
    """The suite's inductor cache folder is named by the vector ISA inductor picks and the CPU: graphs cached under
    another ISA (another machine's CPU, or ATEN_CPU_CAPABILITY) are compiled again for this one, with wrong tokens."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    env["LLMBENCH_CACHE"] = str(tmp_path)
    code = ("from torch._inductor.cpu_vec_isa import pick_vec_isa\n"
            "from llmbench.backends.compile_settings import inductor_cache_dir\n"
            "print(inductor_cache_dir()); print(pick_vec_isa())")

    def folder(**extra) -> tuple[Path, str]:
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parent.parent).stdout.splitlines()
        return Path(out[0]), out[1]

    native, isa = folder()
    assert native.parent == tmp_path / "inductor" and native.name.startswith(isa.replace(" ", "+") + "-")
    avx2, avx2_isa = folder(ATEN_CPU_CAPABILITY="avx2")
    assert avx2.parent == native.parent and (avx2 == native) == (avx2_isa == isa)  # another ISA: another folder
    assert folder(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "mine"))[0] == tmp_path / "mine"  # the user's own is kept
