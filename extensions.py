"""How the two compiled extensions, `nms._C` and `roialign._C`, are built.

`setup.py` uses `extensions()` for the normal build (`pip install --no-build-isolation -e .`), and
each package calls `load_or_build()` when it is imported, so that a checkout whose compiled module is
missing or stale still works: the sources are then compiled on the fly by
`torch.utils.cpp_extension.load` (C++ always, CUDA when it would be built by setup.py too).

Environment:
  FORCE_CUDA=0|1           force the CUDA sources off or on (torchvision's and detectron2's name).
                           Default: on when nvcc, a CUDA build of torch and a GPU are all present, so
                           a laptop without a GPU skips minutes of nvcc it would never use; CI sets
                           FORCE_CUDA=1 (no GPU is needed to compile them) to catch a CUDA build break
  CUDA_HOME                the CUDA toolkit (default: /usr/local/cuda when it exists)
  TORCH_CUDA_ARCH_LIST     GPU architectures (default: Ampere and Hopper, with PTX for newer ones)
"""

import glob
import importlib
import os
import shutil

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ("nms", "roialign")
DEFAULT_ARCH_LIST = "8.0;8.6;9.0+PTX"
# -g0 drops the debug information Python's own build flags ask for: a third of the compile time, and a
# 5 MB object file per source instead of 0.25 MB.
CXX_FLAGS = ["-O3", "-g0", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
LINK_FLAGS = ["-fopenmp"]


def _find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if not home and shutil.which("nvcc"):
        home = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc"))))
    return home


def configure_environment():
    """Sets CUDA_HOME and TORCH_CUDA_ARCH_LIST before torch.utils.cpp_extension reads them."""
    home = _find_cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)


def with_cuda():
    """True when the CUDA sources should be compiled (see the module docstring)."""
    import torch

    home = _find_cuda_home()
    has_nvcc = bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc"))
    torch_cuda = torch.version.cuda is not None
    return cuda_build_wanted(os.environ.get("FORCE_CUDA"), has_nvcc, torch_cuda,
                             torch_cuda and torch.cuda.is_available())


def cuda_build_wanted(forced, has_nvcc: bool, torch_cuda: bool, has_gpu: bool) -> bool:
    """The decision of with_cuda(): FORCE_CUDA's value (None when unset) and what the machine has."""
    if forced not in (None, "", "0", "1"):
        raise ValueError(f"FORCE_CUDA must be 0 or 1; got {forced!r}")
    if forced == "1":
        if not (has_nvcc and torch_cuda):
            raise RuntimeError(
                "FORCE_CUDA=1 but the CUDA build is not possible: "
                f"nvcc {'found' if has_nvcc else 'not found (set CUDA_HOME)'}, "
                f"torch is {'a CUDA' if torch_cuda else 'a CPU-only'} build"
            )
        return True
    return forced != "0" and has_nvcc and torch_cuda and has_gpu


def sources(package, cuda):
    """The C++ (and, with `cuda`, CUDA) sources of one package, relative to the repository."""
    found = sorted(glob.glob(os.path.join(ROOT, package, "csrc", "*.cpp")))
    if cuda:
        found += sorted(glob.glob(os.path.join(ROOT, package, "csrc", "*.cu")))
    return [os.path.relpath(path, ROOT) for path in found]


def extensions():
    """The setuptools extension modules `nms._C` and `roialign._C`."""
    configure_environment()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cuda = with_cuda()
    make = CUDAExtension if cuda else CppExtension
    flags = {"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS} if cuda else {"cxx": CXX_FLAGS}
    return [
        make(f"{package}._C", sources(package, cuda), extra_compile_args=flags, extra_link_args=LINK_FLAGS)
        for package in PACKAGES
    ]


def load_or_build(package):
    """Imports `<package>._C` (which registers the ops under torch.ops.maskrcnn), building it if needed."""
    try:
        return importlib.import_module(f"{package}._C")
    except ImportError as error:
        missing = error
    configure_environment()
    from torch.utils.cpp_extension import load

    cuda = with_cuda()
    try:
        return load(
            name=f"maskrcnn_{package}",
            sources=[os.path.join(ROOT, path) for path in sources(package, cuda)],
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS if cuda else None,
            extra_ldflags=LINK_FLAGS,
            with_cuda=cuda,
            verbose=False,
        )
    except Exception as error:
        raise ImportError(
            f"the compiled module {package}._C is missing ({missing}) and building it on the fly failed "
            f"({type(error).__name__}: {error}). Build it with `make venv` or "
            "`pip install --no-build-isolation -e .` from the repository root; this needs a C++ compiler "
            "(g++), ninja (`pip install ninja`) and, for the CUDA kernels, nvcc with CUDA_HOME set "
            "(or FORCE_CUDA=0 to build the CPU kernels only)."
        ) from error
