"""The three ways to load hydra (SPEC section 5), each checked against the reference.

On a CUDA GPU, each path runs ``hydra.hydra`` on a small random bf16 decode step
(long enough that page selection runs) and compares it with
``hydra.reference.hydra`` computed in fp32: relative error below 2e-2.

* in process, whichever ``hydra`` is importable (the source checkout here, the
  built package in kernel-builder's test shell): marked ``kernels_ci``;
* in a subprocess, from the source checkout (``sys.path.insert(0, "torch-ext")``);
* in a subprocess, from a variant laid out by ``scripts/build_variant.py`` and
  loaded with ``kernels.get_local_kernel``;
* in a subprocess, the same variant through ``LOCAL_KERNELS`` and
  ``kernels.get_kernel("Frosty40/hydra", version=1)``.

Subprocesses keep each load in a fresh interpreter: two copies of the extension
in one process would register the same op namespace twice.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_cuda

ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "Frosty40/hydra"
REL_TOL = 2e-2
BUILD_TIMEOUT_S = 1800  # a cold just-in-time build of every kernel

pytestmark = [pytest.mark.gpu, requires_cuda]

# B=2, Hq=8, Hkv=2 (GQA group of 4), D=128, Tkv=4193: past the "high" budget of
# 4096 tokens, so selection runs, and not a page multiple.
CHECK = r'''
import importlib, json, sys
import torch

def check(hydra_mod):
    reference = importlib.import_module(hydra_mod.__name__ + ".reference")
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, Hq, Hkv, T, D = 2, 8, 2, 4193, 128
    q, k, v = (torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16)
               for shape in [(B, Hq, 1, D), (B, Hkv, T, D), (B, Hkv, T, D)])
    out = hydra_mod.hydra(q, k, v)
    torch.cuda.synchronize()
    ref = reference.hydra(q.float(), k.float(), v.float())
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print("HYDRA_RESULT " + json.dumps({
        "rel_err": err, "shape": list(out.shape), "dtype": str(out.dtype),
        "finite": bool(torch.isfinite(out).all()), "file": hydra_mod.__file__}), flush=True)
'''

FROM_SOURCE = CHECK + r'''
sys.path.insert(0, "torch-ext")
import hydra
check(hydra)
'''

FROM_LOCAL_KERNEL = CHECK + r'''
from pathlib import Path
import kernels
check(kernels.get_local_kernel(Path(sys.argv[1])))
'''

FROM_LOCAL_KERNELS_ENV = CHECK + r'''
import kernels
check(kernels.get_kernel("Frosty40/hydra", version=1))
'''


def _run(code: str, *args: str, env: dict | None = None, timeout: int = BUILD_TIMEOUT_S) -> dict:
    env = dict(env or os.environ)
    env.pop("HYDRA_NO_BUILD", None)  # each path must really load the kernels
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("HYDRA_RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def _check_result(result: dict, expect_under: Path | None = None) -> None:
    assert result["shape"] == [2, 8, 1, 128] and result["dtype"] == "torch.bfloat16", result
    assert result["finite"], result
    assert result["rel_err"] < REL_TOL, f"relative error {result['rel_err']:.3e} >= {REL_TOL}"
    if expect_under is not None:
        assert Path(result["file"]).resolve().is_relative_to(expect_under.resolve()), (
            f"loaded {result['file']}, expected a module under {expect_under}")


def _need_checkout() -> None:
    if not (ROOT / "torch-ext" / "hydra" / "_ops.py").is_file() or not (ROOT / "scripts").is_dir():
        pytest.skip("needs the hydra source checkout (torch-ext/, scripts/)")


@pytest.mark.kernels_ci
def test_import_and_decode():
    import torch

    hydra = importlib.import_module("hydra")
    reference = importlib.import_module("hydra.reference")
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, 8, 1, 128, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 2, 5000, 128, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(1, 2, 5000, 128, device="cuda", generator=gen).to(torch.bfloat16)
    out = hydra.hydra(q, k, v)
    ref = reference.hydra(q.float(), k.float(), v.float())
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert err < REL_TOL, f"relative error {err:.3e} >= {REL_TOL}"


def test_source_checkout_subprocess():
    _need_checkout()
    _check_result(_run(FROM_SOURCE), expect_under=ROOT / "torch-ext" / "hydra")


@pytest.fixture(scope="module")
def variant_root(tmp_path_factory) -> Path:
    """A repo-like directory holding build/<variant>/ made by scripts/build_variant.py."""
    _need_checkout()
    pytest.importorskip("kernels", reason="the kernels package is not installed")
    out = tmp_path_factory.mktemp("hydra_repo") / "build"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_variant.py"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert proc.returncode == 0, f"build_variant failed\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    variant_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert variant_dir.parent == out and (variant_dir / "metadata.json").is_file(), proc.stdout
    assert (variant_dir / "hydra" / "__init__.py").is_file()
    assert list((variant_dir / "hydra").glob("_hydra_*.so")), sorted((variant_dir / "hydra").iterdir())
    return out.parent


def test_get_local_kernel(variant_root):
    result = _run(FROM_LOCAL_KERNEL, str(variant_root))
    _check_result(result, expect_under=variant_root / "build")


def test_local_kernels_env_get_kernel(variant_root):
    env = dict(os.environ, LOCAL_KERNELS=f"{REPO_ID}={variant_root}", HF_HUB_OFFLINE="1")
    result = _run(FROM_LOCAL_KERNELS_ENV, env=env)
    _check_result(result, expect_under=variant_root / "build")
