"""Shared pytest setup for hydra.

- Puts ``torch-ext/`` on ``sys.path`` so ``import hydra`` uses the source
  checkout (building the extension just in time), unless a built hydra package
  is already importable, as in kernel-builder's test shell.
- Registers the markers ``gpu`` (needs a CUDA GPU) and ``kernels_ci`` (the fast
  GPU subset that ``nix run .#ci-test`` runs); pyproject.toml lists them too.
- ``requires_cuda``: a skip marker, and a fixture of the same name, for tests
  that need a CUDA GPU.
- ``kernel_probe`` (fixture): ``kernels_launched``, the CUDA kernels a block of a test
  launched (torch.profiler), for tests that check which kernel ran.
  ``HYDRA_KERNEL_PROBE=0`` turns it off (``scripts/sanitize.py``: under
  compute-sanitizer CUPTI takes no second subscriber).
- With ``HYDRA_KERNEL_TRACE=path`` set, profiles every test's call and appends the
  hydra kernels it launched to that path, one JSON line a test (``scripts/sanitize.py``'s
  coverage pass).
- With ``HYDRA_EVIDENCE_JSON=path`` set, writes the session's passed / failed /
  skipped counts and the failing test ids to that path as evidence (SPEC
  section 6). ``HYDRA_EVIDENCE_KIND`` overrides the kind (default
  ``gpu_tests`` with a GPU, ``cpu_tests`` without).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_EXT = ROOT / "torch-ext"


def _installed_hydra_is_ours() -> bool:
    """A built hydra (ours: it has _ops.py and policy.py) is importable from elsewhere."""
    try:
        spec = importlib.util.find_spec("hydra")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    pkg = Path(spec.origin).resolve().parent
    if TORCH_EXT in pkg.parents:
        return False
    return (pkg / "_ops.py").is_file() and (pkg / "policy.py").is_file()


if TORCH_EXT.is_dir() and not _installed_hydra_is_ours() and str(TORCH_EXT) not in sys.path:
    sys.path.insert(0, str(TORCH_EXT))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


HAS_CUDA = _cuda_available()
CUDA_SKIP_REASON = "needs a CUDA GPU"

#: Skip marker for tests that need a CUDA GPU: ``@requires_cuda`` or
#: ``pytestmark = [pytest.mark.gpu, requires_cuda]``.
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)


@pytest.fixture(name="requires_cuda")
def requires_cuda_fixture():
    """Fixture form of ``requires_cuda``: skips the test without a CUDA GPU."""
    if not HAS_CUDA:
        pytest.skip(CUDA_SKIP_REASON)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped with a reason without one")
    config.addinivalue_line(
        "markers", "kernels_ci: fast GPU subset (under a minute) run by `nix run .#ci-test`")


def pytest_collection_modifyitems(config, items):
    # Tests marked gpu skip, with a reason, on a machine without a CUDA GPU.
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- which kernels ran ----------------------------------------------------------

#: Whether tests may profile to check which kernel ran: not with HYDRA_KERNEL_PROBE=0, nor
#: under HYDRA_KERNEL_TRACE, which profiles every test itself (one profiler at a time).
KERNEL_PROBE = os.environ.get("HYDRA_KERNEL_PROBE", "1") != "0" and not os.environ.get("HYDRA_KERNEL_TRACE")


@contextlib.contextmanager
def kernels_launched():
    """Yields a set that holds, after the block, the names of the CUDA kernels the block
    launched (the block is synchronized before the profiler stops); or None, without
    profiling, when ``HYDRA_KERNEL_PROBE=0``. Tests assert on the names only when not None.
    """
    if not KERNEL_PROBE:
        yield None
        return
    import torch

    names: set = set()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        yield names
        torch.cuda.synchronize()
    names.update(e.name for e in prof.events())


@pytest.fixture
def kernel_probe():
    """``kernels_launched``, for tests that check which kernel ran (a fixture, so that test
    modules need not import this file)."""
    return kernels_launched


_KERNEL_NAME = re.compile(r"(\w+_kernel)\b")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    target = os.environ.get("HYDRA_KERNEL_TRACE")
    if not target or not HAS_CUDA:
        yield
        return
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        yield
        torch.cuda.synchronize()
    found = {m.group(1) for e in prof.events() if "hydra::" in e.name for m in [_KERNEL_NAME.search(e.name)] if m}
    with open(target, "a", encoding="utf-8") as f:
        f.write(json.dumps({"test": item.nodeid, "kernels": sorted(found)}) + "\n")


# --- evidence of a test run -------------------------------------------------------

class _RunCounts:
    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.skipped = 0
        self.failing = []

    def add(self, report):
        if report.when == "call" and report.passed:  # a non-strict xpass counts as passed
            self.passed += 1
        elif report.failed:
            self.failed += 1
            self.failing.append(report.nodeid if report.when == "call"
                                else f"{report.nodeid} ({report.when})")
        elif report.skipped and report.when in ("setup", "call"):
            self.skipped += 1  # skips and xfails


_COUNTS = _RunCounts()


def pytest_runtest_logreport(report):
    if os.environ.get("HYDRA_EVIDENCE_JSON"):
        _COUNTS.add(report)


def _load_evidence_module():
    path = TORCH_EXT / "hydra" / "evidence.py"
    if path.is_file():
        spec = importlib.util.spec_from_file_location("_hydra_evidence", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    from hydra import evidence  # a built package without the checkout

    return evidence


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("HYDRA_EVIDENCE_JSON")
    if not target:
        return
    evidence = _load_evidence_module()
    kind = os.environ.get("HYDRA_EVIDENCE_KIND") or ("gpu_tests" if HAS_CUDA else "cpu_tests")
    args = list(session.config.invocation_params.args)
    evidence.write_evidence(
        target,
        kind=kind,
        command=shlex.join(["python3", "-m", "pytest", *args]),
        summary={"passed": _COUNTS.passed, "failed": _COUNTS.failed, "skipped": _COUNTS.skipped},
        extra={"failing": list(_COUNTS.failing), "exit_status": int(exitstatus)},
    )
