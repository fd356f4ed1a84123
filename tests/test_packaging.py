"""Packaging checks that run on any machine (no GPU): SPEC sections 5 and 6.

build.toml and flake.nix, the pytest markers, the source digest and evidence
files, and the kernel-builder-shaped variant that scripts/build_variant.py lays
out, loaded through the real ``kernels`` resolver with a stand-in extension.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
REPO_ID = "Frosty40/hydra"


def _load(name: str, path: Path):
    """Import one file as a module, without importing (and building) the hydra package."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if not (ROOT / "build.toml").is_file() or not (ROOT / "scripts" / "build_variant.py").is_file():
    pytest.skip("needs the hydra source checkout (build.toml, scripts/)", allow_module_level=True)

evidence = _load("_hydra_evidence_under_test", ROOT / "torch-ext" / "hydra" / "evidence.py")
build_variant = _load("_hydra_build_variant_under_test", ROOT / "scripts" / "build_variant.py")


@pytest.fixture(scope="module")
def build_toml() -> dict:
    with open(ROOT / "build.toml", "rb") as f:
        return tomllib.load(f)


# --- build.toml ---------------------------------------------------------------------

def test_build_toml_general(build_toml):
    general = build_toml["general"]
    assert general["name"] == "hydra"
    assert general["edition"] == 5
    assert isinstance(general["version"], int) and general["version"] >= 1, general["version"]
    assert isinstance(general["license"], str) and general["license"], general.get("license")
    assert general["backends"] == ["cuda"]
    assert general["hub"]["repo-id"] == REPO_ID


def test_build_toml_torch_sources(build_toml):
    src = build_toml["torch"]["src"]
    for required in ("torch-ext/torch_binding.cpp", "torch-ext/torch_binding.h",
                     "torch-ext/hydra_torch.cpp"):
        assert required in src, f"[torch] src lacks {required}: {src}"
    missing = [p for p in src if not (ROOT / p).is_file()]
    assert not missing, f"[torch] src names files that do not exist: {missing}"


def test_build_toml_kernel(build_toml):
    kernel = build_toml["kernel"]["hydra"]
    assert kernel["backend"] == "cuda"
    assert kernel["depends"] == ["torch"]
    assert "csrc" in kernel["include"], kernel["include"]
    caps = kernel["cuda-capabilities"]
    for cap in ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0"):
        assert cap in caps, f"cuda-capabilities lacks {cap}: {caps}"


def test_build_toml_lists_every_csrc_file(build_toml):
    listed = set(build_toml["kernel"]["hydra"]["src"])
    on_disk = {p.relative_to(ROOT).as_posix() for p in CSRC.rglob("*") if p.is_file()}
    assert listed - on_disk == set(), f"build.toml lists missing files: {sorted(listed - on_disk)}"
    assert on_disk - listed == set(), f"csrc files not in build.toml: {sorted(on_disk - listed)}"
    assert any(p.endswith(".cu") for p in listed), f"no .cu sources listed: {sorted(listed)}"


def test_build_toml_passes_kernel_builder_validation():
    # kernels ships kernel-builder's own (strict) build.toml parser.
    rust = pytest.importorskip("kernels._rust", reason="the kernels package is not installed")
    build = rust.Build.open(ROOT)
    assert [str(b).lower() for b in build.general.backends] == ["cuda"], build.general.backends


# --- flake.nix and pytest configuration ---------------------------------------------------

def test_flake_nix():
    text = (ROOT / "flake.nix").read_text()
    flat = " ".join(text.split())
    assert 'kernel-builder.url = "github:huggingface/kernels"' in flat
    assert "kernel-builder.lib.genKernelFlakeOutputs" in flat
    assert "inherit self;" in flat
    assert "path = ./.;" in flat


def test_markers_registered(pytestconfig):
    names = {line.split(":", 1)[0].strip() for line in pytestconfig.getini("markers")}
    assert {"kernels_ci", "gpu"} <= names, sorted(names)
    with open(ROOT / "pyproject.toml", "rb") as f:
        ini = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    in_pyproject = {m.split(":", 1)[0].strip() for m in ini["markers"]}
    assert {"kernels_ci", "gpu"} <= in_pyproject, ini["markers"]
    assert ini["testpaths"] == ["tests"]


# --- source digest ----------------------------------------------------------------------

def _make_tree(root: Path) -> Path:
    (root / "csrc").mkdir(parents=True)
    (root / "csrc" / "kernel.cu").write_text("__global__ void k() {}\n")
    (root / "csrc" / "params.h").write_text("struct P { int n; };\n")
    (root / "torch-ext" / "hydra").mkdir(parents=True)
    (root / "torch-ext" / "torch_binding.cpp").write_text("// ops\n")
    (root / "torch-ext" / "hydra" / "__init__.py").write_text("x = 1\n")
    return root


def _recompute(root: Path) -> str:
    """The algorithm exactly as source_digest's docstring states it."""
    files = []
    for top in ("csrc", "torch-ext"):
        for p in (root / top).rglob("*"):
            rel = p.relative_to(root)
            if p.is_file() and "__pycache__" not in rel.parts and p.suffix != ".pyc":
                files.append(rel.as_posix())
    h = hashlib.sha256()
    for rel in sorted(files, key=lambda s: s.encode()):
        data = (root / rel).read_bytes()
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return "sha256:" + h.hexdigest()


def test_source_digest_of_checkout_is_stable():
    first = evidence.source_digest()
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64, first
    assert evidence.source_digest() == first
    assert evidence.source_digest(ROOT) == first


def test_source_digest_matches_a_copy_of_the_checkout(tmp_path):
    for top in ("csrc", "torch-ext"):
        shutil.copytree(ROOT / top, tmp_path / top,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    assert evidence.source_digest(tmp_path) == evidence.source_digest(ROOT)
    assert evidence.source_digest(tmp_path) == _recompute(tmp_path)


def test_source_digest_follows_the_documented_algorithm(tmp_path):
    root = _make_tree(tmp_path)
    assert evidence.source_digest(root) == _recompute(root)


def test_source_digest_changes_with_csrc_and_torch_ext(tmp_path):
    root = _make_tree(tmp_path)
    base = evidence.source_digest(root)

    (root / "csrc" / "kernel.cu").write_text("__global__ void k() { }\n")
    edited = evidence.source_digest(root)
    assert edited != base

    (root / "csrc" / "kernel.cu").write_text("__global__ void k() {}\n")
    assert evidence.source_digest(root) == base, "reverting the edit must restore the digest"

    (root / "csrc" / "kernel.cu").rename(root / "csrc" / "kernel2.cu")
    assert evidence.source_digest(root) != base, "a rename must change the digest"
    (root / "csrc" / "kernel2.cu").rename(root / "csrc" / "kernel.cu")

    (root / "csrc" / "new.cuh").write_text("")
    assert evidence.source_digest(root) != base, "a new (even empty) file must change the digest"
    (root / "csrc" / "new.cuh").unlink()

    (root / "torch-ext" / "hydra" / "__init__.py").write_text("x = 2\n")
    assert evidence.source_digest(root) != base


def test_source_digest_is_unambiguous(tmp_path):
    # Moving bytes between a path and its content, or between two files, must
    # not produce the same stream.
    a = _make_tree(tmp_path / "a")
    b = _make_tree(tmp_path / "b")
    (a / "csrc" / "x.h").write_text("ab")
    (a / "csrc" / "y.h").write_text("c")
    (b / "csrc" / "x.h").write_text("a")
    (b / "csrc" / "y.h").write_text("bc")
    assert evidence.source_digest(a) != evidence.source_digest(b)


def test_source_digest_ignores_bytecode_and_other_dirs(tmp_path):
    root = _make_tree(tmp_path)
    base = evidence.source_digest(root)
    cache = root / "torch-ext" / "hydra" / "__pycache__"
    cache.mkdir()
    (cache / "__init__.cpython-312.pyc").write_bytes(b"\x00bytecode")
    (root / "torch-ext" / "hydra" / "stray.pyc").write_bytes(b"\x00")
    (root / "tests").mkdir()
    (root / "tests" / "test_x.py").write_text("pass\n")
    (root / "README.md").write_text("# hydra\n")
    assert evidence.source_digest(root) == base


def test_source_digest_refuses_a_non_checkout(tmp_path):
    with pytest.raises(FileNotFoundError, match="csrc"):
        evidence.source_digest(tmp_path)


# --- evidence files -----------------------------------------------------------------------

FAKE_DEVICE = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda": "13.0"}


def test_write_evidence_shape(tmp_path):
    root = _make_tree(tmp_path / "src")
    out = tmp_path / "evidence" / "nested" / "decode_bench.json"
    rows = [{"name": "hydra_cached", "B": 1, "T": 131072, "mode": "graph", "us": 20.5,
             "best_dense_us": 202.0, "speedup_vs_best_dense": 9.85, "floor_us": 18.0,
             "max_rel_err": 0.004}]
    record = evidence.write_evidence(
        out, kind="decode_bench", command=["python3", "benchmarks/benchmark_hydra_decode.py", "--T", "131072"],
        rows=rows, extra={"l2_bytes": 52428800}, root=root, device=FAKE_DEVICE)

    on_disk = json.loads(out.read_text())
    assert on_disk == record
    assert list(on_disk)[:7] == list(evidence.CORE_KEYS)
    assert on_disk["kind"] == "decode_bench"
    assert on_disk["device"] == FAKE_DEVICE["device"]
    assert on_disk["torch"] == FAKE_DEVICE["torch"] and on_disk["cuda"] == "13.0"
    assert on_disk["command"] == "python3 benchmarks/benchmark_hydra_decode.py --T 131072"
    assert on_disk["source_digest"] == evidence.source_digest(root)
    created = datetime.datetime.fromisoformat(on_disk["created"].replace("Z", "+00:00"))
    assert created.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 600
    assert on_disk["rows"] == rows
    assert "summary" not in on_disk
    assert on_disk["l2_bytes"] == 52428800
    assert out.read_text().startswith("{\n  "), "evidence is pretty-printed"
    assert [p.name for p in out.parent.iterdir()] == ["decode_bench.json"], "no temporary left behind"


def test_write_evidence_summary_and_staleness(tmp_path):
    root = _make_tree(tmp_path / "src")
    out = tmp_path / "gpu_tests.json"
    evidence.write_evidence(out, kind="gpu_tests", command="python3 -m pytest -q tests",
                            summary={"passed": 3, "failed": 0, "skipped": 1}, root=root,
                            device=FAKE_DEVICE)
    record = evidence.read_evidence(out)
    assert record["summary"] == {"passed": 3, "failed": 0, "skipped": 1}
    assert "rows" not in record
    assert not evidence.is_stale(out, root=root)
    (root / "csrc" / "kernel.cu").write_text("// changed\n")
    assert evidence.is_stale(out, root=root)


def test_write_evidence_rejects_bad_input(tmp_path):
    root = _make_tree(tmp_path / "src")
    with pytest.raises(ValueError, match="summary"):
        evidence.write_evidence(tmp_path / "x.json", kind="gpu_tests", command="x", root=root,
                                device=FAKE_DEVICE)
    with pytest.raises(ValueError, match="source_digest"):
        evidence.write_evidence(tmp_path / "x.json", kind="gpu_tests", command="x", root=root,
                                summary={}, extra={"source_digest": "sha256:0"}, device=FAKE_DEVICE)
    assert not (tmp_path / "x.json").exists()


def test_device_info_keys():
    info = evidence.device_info()
    assert set(info) == {"device", "torch", "cuda"}
    assert isinstance(info["device"], str) and info["device"]


# --- the build variant ----------------------------------------------------------------------

def test_variant_name():
    assert build_variant.variant_name("2.11.0+cu130", "13.0", machine="x86_64",
                                      system="Linux") == "torch211-cxx11-cu130-x86_64-linux"
    assert build_variant.variant_name("2.9.1", "12.8", machine="x86_64",
                                      system="Linux") == "torch29-cxx11-cu128-x86_64-linux"
    with pytest.raises(RuntimeError, match="CUDA"):
        build_variant.variant_name("2.11.0+cpu", None)


def test_parse_arch_list():
    assert build_variant.parse_arch_list("8.0;9.0") == ["8.0", "9.0"]
    assert build_variant.parse_arch_list("8.0 9.0+PTX") == ["8.0", "9.0+PTX"]
    assert build_variant.parse_arch_list("") == []


def test_metadata_fields(tmp_path, build_toml):
    meta = build_variant.write_metadata(tmp_path, ext_name="_hydra_0123456789ab", archs=["9.0"])
    on_disk = json.loads((tmp_path / "metadata.json").read_text())
    assert on_disk == meta
    for key in ("id", "name", "version", "license", "python-depends", "backend"):
        assert key in on_disk, f"metadata.json lacks {key}: {on_disk}"
    general = build_toml["general"]
    assert on_disk["name"] == general["name"]
    assert on_disk["version"] == general["version"]
    assert on_disk["license"] == general["license"]
    assert on_disk["python-depends"] == []
    assert on_disk["backend"] == {"type": "cuda", "archs": ["9.0"]}
    assert on_disk["id"].isidentifier() and on_disk["id"] != "_hydra_0123456789ab"


def test_metadata_parses_with_kernels(tmp_path):
    rust = pytest.importorskip("kernels._rust", reason="the kernels package is not installed")
    build_variant.write_metadata(tmp_path, ext_name="_hydra_0123456789ab", archs=["8.0", "9.0"])
    meta = rust.Metadata.read_from_file(tmp_path / "metadata.json")
    assert str(meta.name) == "hydra" and meta.name.python_name == "hydra"
    assert meta.version == 1
    assert meta.python_depends == []
    assert meta.backend.backend_type == rust.Backend.CUDA
    assert meta.backend.archs == ["8.0", "9.0"]


STUB_INIT = '''\
from ._ops import ops, add_op_namespace_prefix
from . import policy

__all__ = ["ops", "add_op_namespace_prefix", "policy"]
'''


def _stub_variant(root: Path, ext_name: str) -> Path:
    """A variant laid out by build_variant, with a pure-Python stand-in for the .so."""
    import torch

    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch to name a CUDA variant")
    src_pkg = root / "src" / "hydra"
    src_pkg.mkdir(parents=True)
    (src_pkg / "__init__.py").write_text(STUB_INIT)
    (src_pkg / "policy.py").write_text("PAGE_SIZE = 16\n")
    (src_pkg / "_ops.py").write_text("raise AssertionError('the source _ops.py must not be copied')\n")
    (src_pkg / "__pycache__").mkdir()
    (src_pkg / "__pycache__" / "policy.cpython-312.pyc").write_bytes(b"\x00")

    variant = build_variant.variant_name(torch.__version__, torch.version.cuda,
                                         cxx11_abi=torch.compiled_with_cxx11_abi())
    variant_dir = root / "repo" / "build" / variant
    pkg_dir = variant_dir / "hydra"
    build_variant.write_package(pkg_dir, ext_name=ext_name, so_path=None, src_pkg=src_pkg)
    (pkg_dir / f"{ext_name}.py").write_text("# stands in for the compiled extension\n")
    build_variant.write_metadata(variant_dir, ext_name=ext_name,
                                 archs=["8.0", "8.6", "8.9", "9.0", "10.0", "12.0"])
    return variant_dir


def test_write_package_layout(tmp_path):
    variant_dir = _stub_variant(tmp_path, "_hydra_layout")
    pkg = variant_dir / "hydra"
    assert sorted(p.name for p in pkg.iterdir()) == ["__init__.py", "_hydra_layout.py", "_ops.py",
                                                     "policy.py"]
    ops_src = (pkg / "_ops.py").read_text()
    assert "from . import _hydra_layout" in ops_src
    assert "ops = torch.ops._hydra_layout" in ops_src
    assert "def add_op_namespace_prefix" in ops_src


@pytest.mark.parametrize("where", ["repo", "build", "variant"])
def test_get_local_kernel_finds_the_variant(tmp_path, where):
    kernels = pytest.importorskip("kernels", reason="the kernels package is not installed")
    ext = f"_hydra_local_{where}"
    variant_dir = _stub_variant(tmp_path, ext)
    path = {"repo": variant_dir.parents[1], "build": variant_dir.parent, "variant": variant_dir}[where]
    module = kernels.get_local_kernel(path)
    assert module.add_op_namespace_prefix("sparse_decode") == f"{ext}::sparse_decode"
    assert module.policy.PAGE_SIZE == 16
    assert Path(module.__file__).resolve() == (variant_dir / "hydra" / "__init__.py").resolve()


def test_local_kernels_env_with_get_kernel(tmp_path, monkeypatch):
    kernels = pytest.importorskip("kernels", reason="the kernels package is not installed")
    ext = "_hydra_env"
    variant_dir = _stub_variant(tmp_path, ext)
    monkeypatch.setenv("LOCAL_KERNELS", f"{REPO_ID}={variant_dir.parents[1]}")
    module = kernels.get_kernel(REPO_ID, version=1)
    assert module.add_op_namespace_prefix("x") == f"{ext}::x"
    assert Path(module.__file__).resolve() == (variant_dir / "hydra" / "__init__.py").resolve()
    sys.modules.pop(f"{ext}_cuda", None)


def test_op_checks_go_through_hydra_check():
    """hydra_torch.cpp's checks use HYDRA_CHECK (a message built with std::to_string), never
    TORCH_CHECK with streamed arguments: in the JIT build, streaming a number into
    TORCH_CHECK's message crashed the process instead of raising (NOTES v29 item 3)."""
    import re

    code = (ROOT / "torch-ext" / "hydra_torch.cpp").read_text(encoding="utf-8")
    code = re.sub(r"//[^\n]*", "", code)  # comments may name it
    uses = [m.start() for m in re.finditer(r"\bTORCH_CHECK\s*\(", code)]
    definition = code.find("#define HYDRA_CHECK(cond, ...) TORCH_CHECK(cond, msg(__VA_ARGS__))")
    assert definition >= 0, "HYDRA_CHECK's definition changed; update this test"
    assert uses == [code.find("TORCH_CHECK", definition)], "TORCH_CHECK used outside HYDRA_CHECK"
    assert code.count("HYDRA_CHECK(") > 20


def _drop_returning_blocks(text: str) -> str:
    """text with every brace block that contains a `return` removed (the innermost such
    block first, then again until none is left)."""
    while True:
        opened, cut = [], None
        for i, ch in enumerate(text):
            if ch == "{":
                opened.append(i)
            elif ch == "}" and opened:
                start = opened.pop()
                if "return" in text[start:i]:
                    cut = (start, i + 1)
                    break
        if cut is None:
            return text
        text = text[:cut[0]] + text[cut[1]:]


def test_select_launches_right_after_a_score_launch():
    """select_pages_kernel reads cache_seqlens and cache_leftpad before pdl_wait()
    (benchmarks/NOTES.md v33 item 2). That is safe only because the kernel launched just
    before it on the stream is always a score kernel, whose CTAs all wait for their own
    predecessor before they let the select launch. Hold that order in hydra_torch.cpp:
    between every select launch and the score launch before it, no other kernel launches,
    except in a branch that returns."""
    code = (ROOT / "torch-ext" / "hydra_torch.cpp").read_text(encoding="utf-8")
    selects = [m.start() for m in re.finditer(r"hydra::launch_select_pages\(", code)]
    assert len(selects) >= 3, "the select launches moved; update this test"
    for at in selects:
        score = code.rfind("hydra::launch_score_pages(", 0, at)
        assert score >= 0, f"a select launch at offset {at} has no score launch before it"
        between = code[code.index(";", score) + 1:at]
        assert "hydra::launch_" not in _drop_returning_blocks(between), (
            f"another kernel launches between the score and the select launch at offset {at}")
