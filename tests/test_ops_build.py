"""Building and loading the CPU ops libraries (llmbench/backends/ops_build.py): a library built once is loaded as it
is from any checkout, and a build lock left by a killed build does not make later builds wait forever."""

import os
import shutil
import time

import torch
import torch.utils.cpp_extension as cpp_extension

from llmbench.backends import ops_build

SOURCE = """
#include <ATen/ATen.h>
#include <torch/library.h>
at::Tensor twice(const at::Tensor& x) { return x * 2; }
TORCH_LIBRARY(llmbench_ops_build_test, m) { m.def("twice(Tensor x) -> Tensor", &twice); }
"""
STEM = "llmbench_ops_build_test"


def test_a_built_library_loads_from_another_checkout_and_a_stale_lock_is_removed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "one" / "tiny_op.cpp", tmp_path / "two" / "tiny_op.cpp"
    for path in (first, second):
        path.parent.mkdir()
        path.write_text(SOURCE)
    assert ops_build.build(STEM, [first], [], "a test op") is None, capsys.readouterr().err
    assert torch.ops.llmbench_ops_build_test.twice(torch.ones(2)).tolist() == [2.0, 2.0]
    (folder,) = ops_build.build_dir().glob(f"{STEM}_*")
    library = folder / f"{folder.name}.so"
    built_at = library.stat().st_mtime

    # The same text from another folder (another checkout): loaded as built, not rebuilt for the new path
    calls = []
    real_load = cpp_extension.load
    monkeypatch.setattr(cpp_extension, "load", lambda name, **kw: calls.append(name) or real_load(name, **kw))
    assert ops_build.build(STEM, [second], [], "a test op") is None
    assert calls == [] and library.stat().st_mtime == built_at

    # No library and a lock as a build killed long ago left it: the lock goes, with a line saying so, and torch's
    # loader runs (it would wait for that lock forever; in this process it has the library loaded already)
    library.unlink()
    lock = folder / "lock"
    lock.touch()
    old = time.time() - ops_build.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    assert ops_build.build(STEM, [second], [], "a test op") is None
    assert calls == [folder.name] and not lock.exists()
    assert f"removing a build lock over {ops_build.STALE_LOCK_S // 60} minutes old" in capsys.readouterr().err
    shutil.rmtree(folder)
