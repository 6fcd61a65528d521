"""Builds the compiled extension ``unlearn_fast._C`` from ``csrc/``.

Switches (environment variables), in the spirit of flash-attention's setup.py:

* ``UNLEARN_FAST_SKIP_EXTENSION=1``  build no extension at all (pure-Python install; the package
  then runs on its PyTorch reference and Triton paths).
* ``UNLEARN_FAST_FORCE_CUDA=1``      build the CUDA kernels even if torch sees no GPU (needs nvcc
  and a CUDA build of torch); fail loudly if that is impossible.
* ``UNLEARN_FAST_SKIP_CUDA=1``       build only the C++ CPU kernels.
* ``UNLEARN_FAST_CUDA_ARCHS``        semicolon-separated compute capabilities, default "8.0;9.0"; SASS for
  each, plus PTX of the newest for forward compatibility.

By default the CUDA kernels are built whenever torch is a CUDA build and nvcc is found.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("UNLEARN_FAST_SKIP_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpu_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]

    have_nvcc = cpp_extension.CUDA_HOME is not None
    want_cuda = torch.version.cuda is not None and have_nvcc and not _flag("UNLEARN_FAST_SKIP_CUDA")
    if _flag("UNLEARN_FAST_FORCE_CUDA") and not want_cuda:
        raise RuntimeError(
            "UNLEARN_FAST_FORCE_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}. "
            "Install a CUDA build of torch and set CUDA_HOME to the toolkit holding nvcc."
        )

    if want_cuda:
        archs = os.environ.get("UNLEARN_FAST_CUDA_ARCHS", "8.0;9.0")
        nums = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
        gencode = []
        for num in nums:
            gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        # PTX of the newest arch too: a newer GPU (Blackwell and later) JIT-compiles it at load time.
        newest = max(nums, key=int)
        gencode += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
        ext = cpp_extension.CUDAExtension(
            "unlearn_fast._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("UNLEARN_FAST_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++20", "-lineinfo"] + gencode,
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "unlearn_fast._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
