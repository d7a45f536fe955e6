"""The build switches and the on-the-fly build used when a compiled module is missing."""

import os
import shutil
import subprocess
import sys

import pytest

import extensions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cuda_switch(monkeypatch):
    monkeypatch.setenv("FORCE_CUDA", "0")
    assert extensions.with_cuda() is False
    monkeypatch.setenv("FORCE_CUDA", "yes")
    with pytest.raises(ValueError, match="FORCE_CUDA must be 0 or 1"):
        extensions.with_cuda()


@pytest.mark.parametrize(
    "forced, has_nvcc, torch_cuda, has_gpu, expected",
    [
        (None, True, True, True, True),  # a GPU machine with the toolkit builds CUDA
        (None, True, True, False, False),  # no GPU: minutes of nvcc saved
        (None, False, True, True, False),  # no nvcc
        (None, True, False, False, False),  # CPU-only torch
        ("", True, True, True, True),
        ("0", True, True, True, False),  # forced off
        ("1", True, True, False, True),  # forced on without a GPU (CI)
    ],
)
def test_cuda_build_decision(forced, has_nvcc, torch_cuda, has_gpu, expected):
    assert extensions.cuda_build_wanted(forced, has_nvcc, torch_cuda, has_gpu) is expected


def test_forced_cuda_without_toolkit_says_why():
    with pytest.raises(RuntimeError, match="FORCE_CUDA=1 but the CUDA build is not possible: nvcc not found"):
        extensions.cuda_build_wanted("1", False, True, True)


def test_ci_compiles_the_cuda_kernels():
    """CI has no GPU, so without FORCE_CUDA=1 a CUDA build break would pass unnoticed."""
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "FORCE_CUDA=1 make test" in f.read()


def test_sources_split_cpp_and_cuda():
    cpu = extensions.sources("roialign", cuda=False)
    both = extensions.sources("roialign", cuda=True)
    assert cpu and all(path.endswith(".cpp") for path in cpu)
    assert set(both) - set(cpu) == {os.path.join("roialign", "csrc", "roi_align_cuda.cu")}


def test_failed_build_says_what_to_do(monkeypatch, tmp_path):
    # A package with no sources cannot be built: the error must say how to build it properly.
    monkeypatch.setenv("FORCE_CUDA", "0")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        extensions.load_or_build("no_such_package")


def test_missing_module_is_built_on_the_fly(tmp_path):
    """A checkout without compiled modules still imports: the C++ kernels are compiled at import."""
    for name in ("extensions.py", "nms", "roialign"):
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        else:
            shutil.copy(source, tmp_path / name)
    # The editable install would find this checkout's compiled modules; hide it from the child.
    script = (
        "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
        "import torch, nms, roialign\n"
        "assert 'nms._C' not in sys.modules and nms.__file__.startswith(sys.argv[1])\n"
        "keep = nms.nms(torch.tensor([[0, 0, 2, 2.], [0, 0, 2, 2.1]]), torch.tensor([1, 2.]), 0.5)\n"
        "assert keep.tolist() == [1], keep\n"
        "out = roialign.roi_align(torch.ones(1, 1, 4, 4), torch.tensor([[0, 0, 0, 2, 2.]]), 2)\n"
        "assert out.shape == (1, 1, 2, 2) and bool((out == 1).all()), out\n"
    )
    env = dict(os.environ, FORCE_CUDA="0", TORCH_EXTENSIONS_DIR=str(tmp_path / "build"))
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "build" / "maskrcnn_nms").is_dir()
