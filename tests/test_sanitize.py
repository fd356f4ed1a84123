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
    same sources and device; the rows of tools run again are dropped."""
    import json

    good = {"kind": "sanitizer", "source_digest": "sha256:aa", "device": "NVIDIA H100 80GB HBM3",
            "command": "python3 scripts/sanitize.py --tools memcheck", "created": "2026-11-28T00:00:00Z",
            "rows": [{"tool": "memcheck"}]}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(good))
    assert san.carried(path, ["racecheck"], "sha256:aa", "NVIDIA H100 80GB HBM3")["rows"] == [{"tool": "memcheck"}]
    # a tool that runs again replaces its earlier row
    assert san.carried(path, ["memcheck"], "sha256:aa", "NVIDIA H100 80GB HBM3")["rows"] == []
    for digest, device, what in (("sha256:bb", "NVIDIA H100 80GB HBM3", "source_digest"),
                                 ("sha256:aa", "NVIDIA H200", "device")):
        with pytest.raises(SystemExit, match=what):
            san.carried(path, ["racecheck"], digest, device)
    path.write_text(json.dumps(dict(good, kind="decode_bench")))
    with pytest.raises(SystemExit, match="kind"):
        san.carried(path, ["racecheck"], "sha256:aa", "NVIDIA H100 80GB HBM3")


@pytest.mark.skipif(sys.platform != "linux", reason="fake sanitizer scripts need bash")
def test_initcheck_control_runs_the_control_case(tmp_path):
    """initcheck's positive control runs ``--driver --control`` and counts its reports."""
    init = _fake(tmp_path, "init.sh", 'echo "args: $*"\ncat <<\'X\'\n' + INIT + "driver: 1 cases ok: control_unwritten_k\nX\n")
    row = san.run_tool("initcheck", [], dict(os.environ), 30, init, str(tmp_path), control=True)
    assert "--driver --control" in row["output_tail"] and row["hydra_reports"] > 0
    assert (tmp_path / "sanitize_initcheck_control.log").exists()


def test_readme_section_marks_carried_and_unclean_rows():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render_readme

    run = {"command": "python3 scripts/sanitize.py --tools memcheck", "created": "2026-11-28T00:00:00Z"}
    record = {"device": "GPU X", "created": "2026-11-28T01:00:00Z", "command": "python3 scripts/sanitize.py --carry a",
              "summary": {"kernels_launched": 12, "kernels_defined": 12},
              "rows": [{"tool": "memcheck", "kernels_checked": "hydra", "tests": 39, "passed": 39, "errors": 0,
                        "hydra_reports": 0, "wall_s": 26.6, "clean": True, "run": run},
                       {"tool": "racecheck", "kernels_checked": "hydra", "tests": 18, "passed": 17, "hazards": 3,
                        "hydra_reports": 3, "wall_s": 200.0, "clean": False},
                       {"tool": "initcheck", "kernels_checked": "all", "tests": 1, "passed": 1, "errors": 0,
                        "hydra_reports": 0, "wall_s": 5.0, "clean": True, "driver_cases": ["a", "b"],
                        "driver_failed": ["c (RuntimeError: x)"],
                        "control": {"case": "unwritten K", "hydra_reports": 131328}}]}
    text = render_readme.sanitizer_section(record, Path("evidence/sanitizer.json"), stale=False)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert "¹" in rows["memcheck ¹"] and rows["memcheck ¹"].endswith("✓ |")
    assert rows["racecheck"].endswith("✗ |") and "17 of 18" in rows["racecheck"]
    assert "2 of 3" in rows["initcheck"] and "131,328" in text and run["command"] in text
