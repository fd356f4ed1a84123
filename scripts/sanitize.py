"""compute-sanitizer over hydra's kernels: memcheck, racecheck, synccheck and initcheck,
each over a set of GPU parity tests that reaches every kernel, written as one evidence
file (SPEC section 6).

    python3 scripts/sanitize.py --out evidence/sanitizer.json [--tools memcheck,racecheck]
                                [--limit-s 240] [--tests NODEID ...]

1. A coverage pass without the sanitizer runs the tests with every test's call profiled
   (tests/conftest.py, ``HYDRA_KERNEL_TRACE``) and records the hydra kernels each one
   launched; kernels defined in ``csrc/`` that no test launched are listed as uncovered.
2. One pytest process per tool under ``compute-sanitizer --tool T``, checking only
   hydra's kernels (``--kernel-name kns=hydra``; torch's own kernels run uninstrumented).
   The caching allocator is off (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``), so that memcheck
   sees the end of each tensor and initcheck sees each tensor's first write.
   ``HYDRA_KERNEL_PROBE=0``: CUPTI takes no second subscriber under the sanitizer, so the
   tests skip their own checks of which kernel ran (the coverage pass made them).

Each tool's row: the sanitizer's error count (racecheck: hazards, errors and warnings),
the tests passed and failed under it, its wall time, and whether it finished within
``--limit-s``; its output's tail is in the file. Exits non-zero if any tool reported an
error, failed a test or did not finish.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Tests that reach every kernel and path of the decode step (fused short step, the three
#: one-CTA selections, the cluster selection fused and from scores, e4m3 scoring,
#: coarse-to-fine, head dims 64 / 256, fp16, windows, left padding), the cache and prefill,
#: at sizes a sanitized run finishes. None runs a subprocess (the sanitizer would not
#: follow it).
TESTS = [
    "tests/test_gpu.py::test_decode_parity_small_policy[6-2-97]",
    "tests/test_gpu.py::test_decode_parity_high[16-2-4097]",
    "tests/test_gpu.py::test_decode_parity_high[32-8-65537]",
    "tests/test_gpu.py::test_ragged_seqlens_and_page_sizes[8]",
    "tests/test_gpu.py::test_left_padding[16]",
    "tests/test_gpu.py::test_page_summaries_bitwise[4097]",
    "tests/test_gpu.py::test_sliding_window[100]",
    "tests/test_gpu.py::test_exact_modes_equal_dense",
    "tests/test_gpu.py::test_sparse_attention_padding_and_duplicates",
    "tests/test_gpu.py::test_selection_score_distributions[ties-9000]",
    "tests/test_gpu.py::test_selection_score_distributions[normal-8191]",
    "tests/test_gpu.py::test_selection_score_distributions[ties-3001]",
    "tests/test_gpu.py::test_cluster_selection[2-9-3-64-dtype1-False-300007]",
    "tests/test_gpu.py::test_cluster_selection[1-16-2-256-dtype3-False-300007]",
    "tests/test_gpu.py::test_cluster_selection[2-8-2-128-dtype7-True-600011]",
    "tests/test_gpu.py::test_short_step_matches_separate_kernels[0]",
    "tests/test_gpu.py::test_short_step_matches_separate_kernels[5]",
    "tests/test_gpu.py::test_short_step_matches_separate_kernels[7]",
    "tests/test_gpu.py::test_short_step_ties[40]",
    "tests/test_gpu.py::test_no_recent_window[16]",
    "tests/test_gpu.py::test_coarse_to_fine_matches_reference[0]",
    "tests/test_gpu.py::test_coarse_to_fine_long_rows[150001-8-3]",
    "tests/test_gpu.py::test_head_dims[4097-64-9-3]",
    "tests/test_gpu.py::test_head_dims[20000-256-16-2]",
    "tests/test_gpu.py::test_fp16_parity[15-3-128]",
    "tests/test_gpu.py::test_page_summaries_e4m3[1.0-128-dtype1]",
    "tests/test_gpu.py::test_e4m3_summaries_select_and_attend[64-9-3-dtype1]",
    "tests/test_cache.py::test_prefill_then_appends_match_recomputation[16]",
    "tests/test_cache.py::test_ragged_multi_token_appends[4-fp8_e4m3]",
    "tests/test_cache.py::test_step_equals_append_then_attend[select-fast]",
    "tests/test_cache.py::test_step_equals_append_then_attend[coarse-fast]",
    "tests/test_cache.py::test_step_equals_append_then_attend[select_fp8-fast]",
    "tests/test_cache.py::test_step_through_the_cluster_selection[0-auto]",
    "tests/test_prefill.py::test_prefill_parity[6-2-4160]",
    "tests/test_prefill.py::test_exact_prefill_matches_sdpa[dtype1-192]",
    "tests/test_prefill.py::test_prefill_head_dim_256[dtype0-192]",
    "tests/test_prefill.py::test_sliding_window_prefill[100]",
    "tests/test_prefill.py::test_chunked_prefill[100-4160]",
    "tests/test_prefill.py::test_prefill_head_dim_64_fp16_and_dense_layers",
]

#: racecheck's share (it is the slowest): the kernels with shared-memory exchanges (the
#: selections, the short step and cluster kernels over DSMEM, the attention's split merge,
#: prefill) on one or more shapes each.
RACECHECK_TESTS = [t for t in TESTS if any(s in t for s in (
    "small_policy[6-2-97]", "parity_high[32-8-65537]", "score_distributions", "cluster_selection",
    "short_step", "coarse_to_fine_matches", "head_dims[20000", "prefill_parity", "head_dim_256",
    "[select-fast]"))]

#: initcheck checks every kernel (a kernel filter would leave the writes of torch's own
#: kernels, q's cast for one, untracked, and report hydra's reads of them as
#: uninitialized), so it gets the small cases whose buffers come from torch.empty: the
#: cache's K/V pages and the attention's workspaces.
INITCHECK_TESTS = [
    "tests/test_gpu.py::test_decode_parity_small_policy[6-2-97]",
    "tests/test_cache.py::test_step_equals_append_then_attend[select-fast]",
    "tests/test_prefill.py::test_prefill_parity[6-2-4160]",
]

TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
TOOL_TESTS = {"racecheck": RACECHECK_TESTS, "initcheck": INITCHECK_TESTS}

_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(")
_ERRORS = re.compile(r"ERROR SUMMARY:\s*(\d+) error")
_RACES = re.compile(r"RACECHECK SUMMARY:\s*(\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
_PASSED = re.compile(r"(\d+) passed")
_FAILED = re.compile(r"(\d+) failed")
_PYTEST_END = re.compile(r"\d+ (passed|failed|error).* in [\d.]+s")


def defined_kernels() -> list:
    """The ``__global__`` functions in csrc/."""
    names = set()
    for path in sorted((ROOT / "csrc").glob("*.cu*")):
        names.update(_GLOBAL.findall(path.read_text(encoding="utf-8")))
    return sorted(names)


def coverage(tests, env) -> tuple:
    """Runs the tests once, profiled; returns ({test: [kernels]}, pytest exit status)."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.jsonl"
        e = dict(env, HYDRA_KERNEL_TRACE=str(trace))
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                             env=e)
        per_test = {}
        if trace.exists():
            for line in trace.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                per_test[rec["test"]] = rec["kernels"]
    return per_test, rc


_NOISE = ("Host Frame", "Saved host backtrace", "COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY",
          "Device Frame", "by thread", "Address 0x", "is out of bounds", "and is inside")
_VARYING = re.compile(r"\+0x[0-9a-f]+|\[\d+ hazards?\]|0x[0-9a-f]{6,}|\(\d+,\d+,\d+\)")


def findings(text, limit=40) -> list:
    """The sanitizer's reports, one entry per distinct report: its headline and the
    device location lines under it, with addresses, offsets, thread and block indices and
    hazard counts taken out, and how many times it was reported."""
    counts: dict = {}
    order = []
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        if (not ln.startswith("========= ") or ln.startswith("=========  ") or not ln[10:].strip()
                or any(n in ln for n in _NOISE)):
            continue
        body = [ln[10:].strip()]
        for nxt in lines[i + 1:i + 4]:
            if not nxt.startswith("=========  "):
                break
            t = nxt[10:].strip()
            if t.startswith(("at ", "and ")):
                body.append(t)
        key = _VARYING.sub("", " | ".join(body))
        if key not in counts:
            order.append(key)
            counts[key] = 0
        counts[key] += 1
    return [{"report": k, "count": counts[k]} for k in order[:limit]]


def run_tool(tool, tests, env, limit_s, sanitizer, log_dir) -> dict:
    only_hydra = [] if tool == "initcheck" else ["--kernel-name", "kns=hydra"]
    cmd = [sanitizer, "--tool", tool, *only_hydra, "--print-limit", "100", "--show-backtrace", "device",
           sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
        text, finished, rc = r.stdout + r.stderr, True, r.returncode
    except subprocess.TimeoutExpired as ex:
        text = (ex.stdout or b"").decode(errors="replace") if isinstance(ex.stdout, bytes) else (ex.stdout or "")
        text += (ex.stderr or b"").decode(errors="replace") if isinstance(ex.stderr, bytes) else (ex.stderr or "")
        finished, rc = False, None
    wall = time.time() - t0
    row = {"tool": tool, "kernels_checked": "all" if not only_hydra else "hydra", "finished": finished,
           "exit_status": rc, "wall_s": round(wall, 1), "tests": len(tests)}
    m = _RACES.search(text)
    if m:
        row.update(hazards=int(m.group(1)), errors=int(m.group(2)), warnings=int(m.group(3)))
    else:
        m = _ERRORS.search(text)
        row["errors"] = int(m.group(1)) if m else None
    # pytest's last summary line ("39 passed, 2 warnings in 80.1s"); the sanitizer's own
    # lines start with "=========".
    ends = [ln for ln in text.splitlines() if _PYTEST_END.search(ln) and not ln.startswith("=========")]
    summary_line = ends[-1] if ends else ""
    row["passed"] = int(_PASSED.search(summary_line).group(1)) if _PASSED.search(summary_line) else 0
    row["failed"] = int(_FAILED.search(summary_line).group(1)) if _FAILED.search(summary_line) else 0
    row["findings"] = findings(text)
    # reports located in hydra's kernels (of the ones printed, at most --print-limit)
    row["hydra_reports"] = sum(f["count"] for f in row["findings"] if "hydra::" in f["report"])
    row["output_tail"] = text[-3000:]
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        (Path(log_dir) / f"sanitize_{tool}.log").write_text(text, encoding="utf-8")
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "evidence" / "sanitizer.json"))
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, from " + ", ".join(TOOLS))
    ap.add_argument("--limit-s", type=float, default=240.0, help="wall-clock limit for each tool's run")
    ap.add_argument("--tests", nargs="*", default=None, help="pytest node ids (default: TESTS)")
    ap.add_argument("--log-dir", default=os.environ.get("LOGS", "/tmp/hydra_logs"),
                    help="where each tool's whole output is written (sanitize_TOOL.log)")
    ap.add_argument("--no-coverage", action="store_true", help="skip the coverage pass")
    args = ap.parse_args()

    tools = [t for t in args.tools.split(",") if t]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        ap.error(f"--tools: unknown tool(s) {bad}; choose from {list(TOOLS)}")
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not Path(sanitizer).exists():
        sys.exit("scripts/sanitize.py: compute-sanitizer not found on PATH or in /usr/local/cuda/bin")
    tests = args.tests or TESTS
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_KERNEL_PROBE="0", PYTORCH_NO_CUDA_MEMORY_CACHING="1")

    per_test, cov_rc = ({}, None) if args.no_coverage else coverage(tests, env)
    launched = sorted({k for ks in per_test.values() for k in ks})
    defined = defined_kernels()
    uncovered = [k for k in defined if k not in launched]
    print(f"coverage pass: pytest exit {cov_rc}; kernels launched {launched}; not launched {uncovered}", flush=True)

    rows = []
    for tool in tools:
        row = run_tool(tool, args.tests or TOOL_TESTS.get(tool, TESTS), env, args.limit_s, sanitizer, args.log_dir)
        rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("output_tail", "findings")}
        shown["findings"] = row["findings"][:8]
        print(json.dumps(shown), flush=True)

    version = subprocess.run([sanitizer, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    sys.path.insert(0, str(ROOT / "torch-ext"))
    from hydra.evidence import write_evidence

    for r in rows:
        # clean: finished, every test passed, and no report (initcheck, which checks torch's
        # kernels too: none in hydra's, and its error count is all of them)
        r["clean"] = bool(r["finished"] and r["failed"] == 0 and r["passed"] == r["tests"]
                          and (r.get("errors") == 0 or (r["tool"] == "initcheck" and r["hydra_reports"] == 0
                                                        and r.get("errors") is not None)))
    clean = all(r["clean"] for r in rows)
    summary = {"tools": len(rows), "clean": sum(r["clean"] for r in rows),
               "kernels_defined": len(defined), "kernels_launched": len(launched)}
    write_evidence(args.out, kind="sanitizer", command="python3 scripts/sanitize.py " + " ".join(sys.argv[1:]),
                   summary=summary, rows=rows,
                   extra={"sanitizer": version[-1] if version else None, "tests": tests,
                          "tests_by_tool": {r["tool"]: args.tests or TOOL_TESTS.get(r["tool"], TESTS) for r in rows},
                          "coverage_pytest_exit_status": cov_rc, "kernels_defined": defined,
                          "kernels_launched": launched, "kernels_not_launched": uncovered,
                          "kernels_by_test": per_test})
    print(json.dumps(summary))
    return 0 if clean and cov_rc in (0, None) and not uncovered else 1


if __name__ == "__main__":
    sys.exit(main())
