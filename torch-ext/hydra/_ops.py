"""Op loader for a source checkout: builds the CUDA extension just in time.

A kernel-builder build (and ``scripts/build_variant.py``) replaces this file
with a two-line loader that imports the prebuilt extension module; the package
only ever uses ``ops`` and ``add_op_namespace_prefix`` from here.

The build uses ``torch.utils.cpp_extension.load`` with ninja and is cached under
torch's extension directory, keyed by a digest of the sources, so an edited
kernel rebuilds and an unchanged one loads in about a second.
Environment:
  ``TORCH_CUDA_ARCH_LIST``  architectures to build (default: the visible GPU's,
                            or 8.0 on a machine without one, which only checks
                            that the sources compile and link).
  ``HYDRA_NO_BUILD=1``      skip the build; only ``hydra.reference`` works.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

_TORCH_EXT = Path(__file__).resolve().parent.parent  # torch-ext/
_ROOT = _TORCH_EXT.parent
_CSRC = _ROOT / "csrc"

build_error: "Exception | None" = None


def _sources():
    cu = sorted(_CSRC.glob("*.cu"))
    cpp = [_TORCH_EXT / "torch_binding.cpp", _TORCH_EXT / "hydra_torch.cpp"]
    return [str(p) for p in cpp + cu]


def _digest() -> str:
    h = hashlib.sha256()
    files = sorted(_CSRC.glob("*")) + sorted(_TORCH_EXT.glob("*.cpp")) + sorted(_TORCH_EXT.glob("*.h")) \
        + sorted((_TORCH_EXT / "jit").glob("*"))
    for p in files:
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update(torch.__version__.encode())
    h.update(os.environ.get("TORCH_CUDA_ARCH_LIST", "").encode())
    return h.hexdigest()[:12]


def _arch_list() -> str:
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return "8.0"


def build(verbose: bool = False):
    """Build (or load from cache) the extension; returns its module name."""
    # torch guesses CUDA_HOME from the nvcc on PATH, which can be a wrapper outside
    # the toolkit; prefer the standard location when nothing is set.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") \
            and Path("/usr/local/cuda/include/cuda_runtime.h").is_file():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils import cpp_extension

    if os.environ.get("CUDA_HOME") and cpp_extension.CUDA_HOME != os.environ["CUDA_HOME"]:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # imported earlier with a guess
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch = _arch_list()
    name = f"_hydra_{_digest()}"
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    cached = any(Path(build_dir).glob(f"{name}*.so"))
    if not cached:
        print(f"hydra: building the CUDA extension for sm_{arch.replace('.', '')} "
              f"into {build_dir} (first import only, about a minute)", file=sys.stderr, flush=True)
    cpp_extension.load(
        name=name,
        sources=_sources(),
        extra_include_paths=[str(_CSRC), str(_TORCH_EXT), str(_TORCH_EXT / "jit")],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo",
                           "--expt-relaxed-constexpr"],
        is_python_module=True,
        verbose=verbose,
    )
    return name


ops = None
_namespace = None
if os.environ.get("HYDRA_NO_BUILD") != "1":
    try:
        _namespace = build(verbose=os.environ.get("HYDRA_BUILD_VERBOSE") == "1")
        ops = getattr(torch.ops, _namespace)
    except Exception as e:  # no nvcc, no CUDA torch, or a compile error: keep the reference usable
        build_error = e
        print(f"hydra: the CUDA extension is unavailable ({type(e).__name__}: {str(e)[:300]}); "
              "only hydra.reference will work", file=sys.stderr, flush=True)


def add_op_namespace_prefix(op_name: str) -> str:
    if _namespace is None:
        raise RuntimeError(f"hydra: the CUDA extension failed to build: {build_error}")
    return f"{_namespace}::{op_name}"
