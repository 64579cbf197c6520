"""CPU kind from /proc/cpuinfo, and the default dtype it implies (with a warning for an emulated one)."""

import pytest
import torch

from llmbench.devices import choose_dtype, default_cpu_dtype
from llmbench.host import CPUINFO, cpu_kind, parse_cpuinfo
from llmbench.records import read_records

CPU = torch.device("cpu")
BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c"
# /proc/cpuinfo flag strings of the CPU kinds the suite meets (abridged to what matters).
SAMPLES = {
    "avx2 epyc": (f"{BASE} fma avx2 bmi2", "AVX2", "float32"),
    "avx-512 epyc": (f"{BASE} fma avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx512_vbmi", "AVX-512 + bf16",
                     "bfloat16"),
    "amx xeon": (f"{BASE} fma avx2 avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8", "AMX",
                 "bfloat16"),
    "avx-512 without bf16": (f"{BASE} fma avx2 avx512f avx512_vnni", "AVX-512", "float32"),
    "fp16 only": (f"{BASE} fma avx2 avx512f avx512_fp16", "AVX-512 + fp16", "float16"),
    "pre-avx2": (BASE, "baseline", "float32"),
}


def cpuinfo_text(flags: str, model: str = "Test CPU 9000") -> str:
    one = f"processor\t: 0\nvendor_id\t: Test\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
    return one + one.replace("processor\t: 0", "processor\t: 1")


@pytest.mark.parametrize("sample", SAMPLES, ids=list(SAMPLES))
def test_kind_and_default_dtype_per_flag_set(sample):
    flags, kind, dtype_name = SAMPLES[sample]
    cpu = parse_cpuinfo(cpuinfo_text(flags))
    assert cpu.model_name == "Test CPU 9000" and cpu.kind == kind
    assert set(cpu.relevant_flags) <= set(flags.split())
    choice = choose_dtype(None, CPU, cpu)
    assert str(choice.dtype) == f"torch.{dtype_name}" and choice.warning is None
    assert choice.reason.startswith("default on cpu") and kind in choice.reason
    record = cpu.to_record()
    assert record["kind"] == kind and record["model_name"] == "Test CPU 9000"


@pytest.mark.parametrize("sample", SAMPLES, ids=list(SAMPLES))
def test_explicit_emulated_dtype_warns_once_with_what_is_native(sample):
    flags, _, native = SAMPLES[sample]
    cpu = parse_cpuinfo(cpuinfo_text(flags))
    for name, has in (("bfloat16", cpu.native_bf16), ("float16", cpu.native_fp16)):
        choice = choose_dtype(name, CPU, cpu)
        assert str(choice.dtype) == f"torch.{name}"
        if has:
            assert choice.warning is None and choice.reason == f"--dtype {name}"
        else:
            assert choice.warning is not None and "\n" not in choice.warning
            assert f"no native {name}" in choice.warning and f"natively it runs {native}" in choice.warning
            assert "emulated" in choice.reason
    assert choose_dtype("float32", CPU, cpu).warning is None


def test_family_and_model_numbers_tell_generations_apart():
    """A guest's model name may say only 'AMD EPYC': the family and model numbers name the generation."""
    text = cpuinfo_text(SAMPLES["avx-512 epyc"][0], model="AMD EPYC")
    newer = parse_cpuinfo(text.replace("model name", "cpu family\t: 26\nmodel\t\t: 2\nmodel name"))
    older = parse_cpuinfo(text.replace("model name", "cpu family\t: 25\nmodel\t\t: 17\nmodel name"))
    assert newer.generation == "family 26 model 2" and older.generation == "family 25 model 17"
    assert newer.describe().startswith("AMD EPYC family 26 model 2 (AVX-512 + bf16: ")
    assert newer.to_record()["generation"] == "family 26 model 2" and newer.model_name == "AMD EPYC"
    assert newer.flags == older.flags and newer.kind == older.kind
    unnumbered = parse_cpuinfo(text)
    assert unnumbered.generation == "" and unnumbered.describe().startswith("AMD EPYC (AVX-512 + bf16: ")


def test_both_bf16_and_fp16_prefer_bf16():
    cpu = parse_cpuinfo(cpuinfo_text(SAMPLES["amx xeon"][0] + " amx_fp16"))
    assert cpu.native_bf16 and cpu.native_fp16 and cpu.kind == "AMX + fp16"
    assert default_cpu_dtype(cpu)[0] == "bfloat16"


def test_gpu_default_is_unchanged():
    assert choose_dtype(None, torch.device("cuda")).dtype == torch.float16


def test_this_host_from_the_real_cpuinfo():
    text = open(CPUINFO, encoding="utf-8").read()
    flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    cpu = cpu_kind()
    assert cpu.model_name and cpu.model_name in text
    assert cpu.flags == flags
    expected = ("bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else
                "float16" if flags & {"avx512_fp16", "amx_fp16"} else "float32")
    assert choose_dtype(None, CPU).dtype == getattr(torch, expected)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", None])
def test_run_records_cpu_kind_and_dtype_reason(run_main, tmp_path, tiny_llama, monkeypatch, dtype):
    """One warning line on stderr exactly when this CPU only emulates the dtype asked for; none for the default."""
    monkeypatch.setenv("LLMBENCH_READ_BANDWIDTH_GB_S", "10")
    results = tmp_path / "r.jsonl"
    status, _, err = run_main("--benchmark", "-m", str(tiny_llama), "--device", "cpu", "--greedy", "--input-tokens",
                              "8", "--max-new-tokens", "3", "--num-iter", "1", "--num-warmup", "0", "--quiet",
                              "--results", str(results), *(["--dtype", dtype] if dtype else []))
    assert status == 0, err
    cpu = cpu_kind()
    native = {"bfloat16": cpu.native_bf16, "float16": cpu.native_fp16, None: True}[dtype]
    warnings = [line for line in err.splitlines() if "warning: --dtype" in line]
    assert len(warnings) == (0 if native else 1), err
    (record,) = read_records(results)
    assert record["environment"]["cpu_kind"] == cpu.to_record()
    if dtype is None:
        assert record["dtype"] == default_cpu_dtype(cpu)[0]
        assert record["dtype_reason"] == default_cpu_dtype(cpu)[1]
    else:
        assert record["dtype"] == dtype and record["dtype_reason"].startswith(f"--dtype {dtype}")
        assert ("emulated" in record["dtype_reason"]) == (not native)
