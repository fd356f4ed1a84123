"""scripts/sanitize.py without a GPU: its test list names real tests, its kernel list is
csrc's, its report parser groups what compute-sanitizer prints, and a tool run that
overruns its limit is stopped and reported as unfinished."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("hydra_sanitize_under_test", ROOT / "scripts" / "sanitize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


san = _load()


@pytest.mark.parametrize("nodeid", san.TESTS)
def test_listed_tests_exist(nodeid):
    """Each listed id names a test function of its file, parametrized when the id has
    parameters (the ids themselves are checked on the GPU: the coverage pass runs them all)."""
    path, _, rest = nodeid.partition("::")
    name = rest.split("[", 1)[0]
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert name in funcs, f"{nodeid}: no test function {name} in {path}"
    parametrized = any("parametrize" in ast.unparse(d) for d in funcs[name].decorator_list)
    assert parametrized == ("[" in rest), nodeid


def test_racecheck_list_is_a_subset():
    assert san.RACECHECK_TESTS and set(san.RACECHECK_TESTS) <= set(san.TESTS)


def test_defined_kernels_are_csrc_globals():
    names = san.defined_kernels()
    n_global = sum(p.read_text(encoding="utf-8").count("__global__") for p in (ROOT / "csrc").glob("*.cu*"))
    assert len(names) == n_global and all(n.endswith("_kernel") for n in names), names


RACE = """========= COMPUTE-SANITIZER
========= Error: Race reported between Read access at void hydra::k<(int)128>(P)+0xc270 in a.cuh:167
=========     and Write access at void hydra::k<(int)128>(P)+0xcda0 in a.cuh:173 [5184 hazards]
=========
........ [100%]
========= Error: Race reported between Read access at void hydra::k<(int)128>(P)+0xba20 in a.cuh:167
=========     and Write access at void hydra::k<(int)128>(P)+0xce10 in a.cuh:173 [3800 hazards]
=========
8 passed in 3.10s
========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)
"""

INIT = """========= Uninitialized __global__ memory read of size 16 bytes
=========     at __ldg(const uint4 *)+0xdd0 in sm_32_intrinsics.hpp:131
=========     by thread (32,0,0) in block (0,0,0)
=========     Address 0x7f0a36801800
=========         Device Frame: hydra::ldg16(const void *)+0xdd0 in common.cuh:60
=========         Device Frame: void hydra::score_pages_kernel<(int)128>(hydra::ScoreParams)+0x940 in s.cu:122
=========
========= Uninitialized __global__ memory read of size 2 bytes
=========     at void at::native::copy_kernel<float>(int)+0x830
=========     by thread (67,0,0) in block (272,0,0)
=========
========= Uninitialized __global__ memory read of size 16 bytes
=========     at __ldg(const uint4 *)+0xdd0 in sm_32_intrinsics.hpp:131
=========     by thread (33,0,0) in block (0,0,0)
=========         Device Frame: void hydra::score_pages_kernel<(int)128>(hydra::ScoreParams)+0x940 in s.cu:122
========= ERROR SUMMARY: 3 errors
"""


def test_reports_group_by_location():
    race = san.findings(RACE)
    assert race == [{"report": "Error: Race reported between Read access at void hydra::k<(int)128>(P) in a.cuh:167"
                               " | and Write access at void hydra::k<(int)128>(P) in a.cuh:173 ", "count": 2}]
    init = san.findings(INIT)
    assert [f["count"] for f in init] == [2, 1]
    assert "hydra::score_pages_kernel" in init[0]["report"] and "at::native" in init[1]["report"]


def _fake(tmp_path, name, body):
    p = tmp_path / name
    p.write_text("#!/bin/bash\n" + body)
    p.chmod(0o755)
    return str(p)


@pytest.mark.skipif(sys.platform != "linux", reason="fake sanitizer scripts need bash")
def test_run_tool_counts_and_limits(tmp_path):
    env = dict(os.environ)
    racy = _fake(tmp_path, "racy.sh", "cat <<'X'\n" + RACE + "X\n")
    row = san.run_tool("racecheck", ["t"] * 8, env, 30, racy, str(tmp_path / "logs"))
    assert row["finished"] and (row["hazards"], row["errors"], row["passed"], row["failed"]) == (2, 2, 8, 0)
    assert row["hydra_reports"] == 2 and (tmp_path / "logs" / "sanitize_racecheck.log").read_text().strip()
    init = _fake(tmp_path, "init.sh", "cat <<'X'\n" + INIT + "driver: 2 cases ok: a, b\nX\n")
    row = san.run_tool("initcheck", [], env, 30, init, None)
    assert row["finished"] and row["errors"] == 3 and row["hydra_reports"] == 2 and row["driver_cases"] == ["a", "b"]
    hang = _fake(tmp_path, "hang.sh", "echo '....'\nbash -c 'sleep 60; echo late'\n")
    row = san.run_tool("memcheck", ["t"], env, 2, hang, None)
    assert not row["finished"] and row["errors"] is None and row["wall_s"] < 30


def test_carry_takes_only_a_matching_earlier_run(tmp_path):
    """``--carry``: an earlier file joins this run's only when it is this script's, of the
    same sources and device, and none of its tools runs again."""
    import json

    good = {"kind": "sanitizer", "source_digest": "sha256:aa", "device": "NVIDIA H100 80GB HBM3",
            "command": "python3 scripts/sanitize.py --tools memcheck", "created": "2026-11-28T00:00:00Z",
            "rows": [{"tool": "memcheck"}]}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(good))
    assert san.carried(path, ["racecheck"], "sha256:aa", "NVIDIA H100 80GB HBM3")["rows"] == [{"tool": "memcheck"}]
    for tools, digest, device, what in ((["racecheck"], "sha256:bb", "NVIDIA H100 80GB HBM3", "source_digest"),
                                        (["racecheck"], "sha256:aa", "NVIDIA H200", "device"),
                                        (["memcheck"], "sha256:aa", "NVIDIA H100 80GB HBM3", "run again")):
        with pytest.raises(SystemExit, match=what):
            san.carried(path, tools, digest, device)
    path.write_text(json.dumps(dict(good, kind="decode_bench")))
    with pytest.raises(SystemExit, match="kind"):
        san.carried(path, ["racecheck"], "sha256:aa", "NVIDIA H100 80GB HBM3")
