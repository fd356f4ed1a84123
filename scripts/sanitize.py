"""compute-sanitizer over hydra's kernels, its four tools in turn, written as one
evidence file (SPEC section 6).

    python3 scripts/sanitize.py --out evidence/sanitizer.json [--tools memcheck,racecheck]
                                [--limit-s S] [--tests NODEID ...] [--carry EARLIER.json]
    bash scripts/gpu_check.sh sanitize      # the same, after the build, on a GPU machine

The four tools take about 6 minutes on an H100 (NOTES v32), near one device call's 600 s
limit. ``--carry`` splits them over two calls: the second names the first call's file, and its rows (and, with
``--no-coverage``, its coverage pass) go into this run's file, each carried row marked
with the run that made it. The earlier file must come from this script, on the same
sources (digest) and the same device.

1. A coverage pass without the sanitizer runs TESTS (GPU parity tests) with every test's
   call profiled (tests/conftest.py, ``HYDRA_KERNEL_TRACE``) and records the hydra
   kernels each one launched; kernels defined in ``csrc/`` that none launched are listed.
2. memcheck and synccheck over TESTS, racecheck over RACECHECK_TESTS (the kernels that
   exchange data through shared memory), each one pytest process under
   ``compute-sanitizer --kernel-name kns=hydra``: only hydra's kernels are instrumented.
   ``HYDRA_KERNEL_PROBE=0``: CUPTI takes no second subscriber under the sanitizer, so the
   tests skip their own checks of which kernel ran (the coverage pass made those).
3. initcheck over ``--driver`` (every decode, cache and prefill path, no reference
   computations) with every kernel instrumented: under a kernel filter, the writes of
   torch's kernels are not tracked and hydra's reads of them come out as uninitialized.
   Reports in hydra's kernels are what count; torch's are listed beside them.

The caching allocator is off (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``), so that memcheck sees
the end of each tensor and initcheck each tensor's first write. Each tool's row: its
error count (racecheck: hazards, errors, warnings), the distinct reports with their
counts, the tests passed and failed under it, its wall time and whether it finished
within its limit (LIMITS); its whole output goes to ``--log-dir``. Exits non-zero unless
every tool finished clean and the tests reached every kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
    # issue 9's matrix (tests/test_groups.py): groups that are not powers of two, and 16
    "tests/test_groups.py::test_decode_every_group[float16-D64-G7]",
    "tests/test_groups.py::test_decode_every_group[bfloat16-D256-G13]",
    "tests/test_groups.py::test_decode_every_group[float16-D128-G16]",
    "tests/test_groups.py::test_decode_every_group[bfloat16-D128-G5]",
    "tests/test_groups.py::test_prefill_every_group[bfloat16-D64-G11]",
    "tests/test_groups.py::test_prefill_every_group[float16-D256-G3]",
    "tests/test_groups.py::test_cache_step_every_group[float16-D64-G9]",
    "tests/test_groups.py::test_cache_step_every_group[bfloat16-D256-G6]",
]

#: racecheck's share (it is the slowest): the kernels with shared-memory exchanges (the
#: selections, the short step and cluster kernels over DSMEM, the attention's split merge,
#: prefill) on one or more shapes each.
RACECHECK_TESTS = [t for t in TESTS if any(s in t for s in (
    "small_policy[6-2-97]", "parity_high[32-8-65537]", "score_distributions", "cluster_selection",
    "short_step", "coarse_to_fine_matches", "head_dims[20000", "prefill_parity", "head_dim_256",
    "[select-fast]", "every_group[bfloat16-D256-G13]", "every_group[bfloat16-D64-G11]"))]

TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
TOOL_TESTS = {"racecheck": RACECHECK_TESTS}
#: Wall-clock limits (s). Measured on an H100 (NOTES v32, 47 tests): memcheck 25 s and
#: synccheck 15 s over TESTS, racecheck 193 s over RACECHECK_TESTS (20), initcheck 6 s over
#: the driver and 42 s over its control.
LIMITS = {"memcheck": 150.0, "racecheck": 300.0, "synccheck": 150.0, "initcheck": 180.0}

_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(")
_ERRORS = re.compile(r"ERROR SUMMARY:\s*(\d+) error")
_RACES = re.compile(r"RACECHECK SUMMARY:\s*(\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
_PASSED = re.compile(r"(\d+) passed")
_FAILED = re.compile(r"(\d+) failed")
_PYTEST_END = re.compile(r"\d+ (passed|failed|error).* in [\d.]+s")
_DRIVER_OK = re.compile(r"driver: (\d+) cases ok: (.*)")
_DRIVER_FAILED = re.compile(r"driver: (\d+) cases failed: (.*)")


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


class Reports:
    """The sanitizer's reports, fed one output line at a time: one entry per distinct
    report (its headline and the device location lines under it, with addresses, offsets,
    thread and block indices and hazard counts taken out) and how often it came."""

    def __init__(self):
        self.counts: dict = {}
        self._open = None  # [headline, location lines] of the report being read
        self._frame = None  # its last device frame: the kernel, when the location is a helper

    def _close(self):
        if self._open:
            parts = self._open + ([self._frame] if self._frame else [])
            key = _VARYING.sub("", " | ".join(parts))
            self.counts[key] = self.counts.get(key, 0) + 1
        self._open = self._frame = None

    def feed(self, line: str) -> None:
        if line.startswith("=========  "):  # indented: a detail of the open report
            t = line[10:].strip()
            if self._open is not None and t.startswith(("at ", "and ")) and len(self._open) < 3:
                self._open.append(t)
            elif self._open is not None and t.startswith("Device Frame:"):
                self._frame = t
            return
        self._close()
        if line.startswith("========= ") and line[10:].strip() and not any(n in line for n in _NOISE):
            self._open = [line[10:].strip()]

    def result(self, limit=40) -> list:
        self._close()
        return [{"report": k, "count": n} for k, n in list(self.counts.items())[:limit]]


def findings(text, limit=40) -> list:
    """``Reports`` over a whole output."""
    r = Reports()
    for ln in text.splitlines():
        r.feed(ln)
    return r.result(limit)


def run_tool(tool, tests, env, limit_s, sanitizer, log_dir, control=False) -> dict:
    """One tool over the tests (pytest), or for initcheck over ``--driver`` (``control``:
    over ``--driver --control``). The output is read as it comes (initcheck's can run to
    hundreds of MB) and kept whole in the log (up to 64 MB) and as a tail in the row."""
    if tool == "initcheck":
        # Every kernel is checked: under a kernel filter the writes of torch's kernels (q's
        # cast, the cache's zeroed lengths) are not tracked, and hydra's reads of them come
        # out as uninitialized. The driver runs no reference computations.
        target, filt, limit = [str(Path(__file__).resolve()), "--driver", *(["--control"] if control else [])], \
            [], "100000000"
    else:
        target, filt, limit = ["-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], \
            ["--kernel-name", "kns=hydra"], "100"
    cmd = [sanitizer, "--tool", tool, *filt, "--print-limit", limit, "--show-backtrace", "device",
           sys.executable, *target]
    reports = Reports()
    tail: list = []
    log = None
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        log = open(Path(log_dir) / f"sanitize_{tool}{'_control' if control else ''}.log", "w", encoding="utf-8")
    logged = 0
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, start_new_session=True)
    killed = threading.Event()

    def kill():  # the sanitizer and the process it runs: the pipe closes only when both are gone
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(limit_s, kill)
    timer.start()
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            reports.feed(line)
            tail.append(line)
            if len(tail) > 400:
                del tail[:200]
            if log is not None and logged < 64 << 20:
                log.write(line + "\n")
                logged += len(line) + 1
        rc = proc.wait()
    finally:
        timer.cancel()
        if log is not None:
            log.close()
    wall = time.time() - t0
    text = "\n".join(tail)
    finished = not killed.is_set()
    row = {"tool": tool, "kernels_checked": "all" if not filt else "hydra", "finished": finished,
           "exit_status": rc if finished else None, "wall_s": round(wall, 1),
           "tests": 1 if tool == "initcheck" else len(tests)}
    m = _RACES.search(text)
    if m:
        row.update(hazards=int(m.group(1)), errors=int(m.group(2)), warnings=int(m.group(3)))
    else:
        m = _ERRORS.search(text)
        row["errors"] = int(m.group(1)) if m else None
    if tool == "initcheck":
        m, bad = _DRIVER_OK.search(text), _DRIVER_FAILED.search(text)
        row["passed"], row["failed"] = (1, 0) if m and not bad and finished else (0, 1 if finished else 0)
        row["driver_cases"] = m.group(2).split(", ") if m and m.group(2) else []
        row["driver_failed"] = bad.group(2).split("; ") if bad else []
    else:
        # pytest's last summary line ("39 passed, 2 warnings in 80.1s"); the sanitizer's
        # own lines start with "=========".
        ends = [ln for ln in tail if _PYTEST_END.search(ln) and not ln.startswith("=========")]
        summary_line = ends[-1] if ends else ""
        row["passed"] = int(_PASSED.search(summary_line).group(1)) if _PASSED.search(summary_line) else 0
        row["failed"] = int(_FAILED.search(summary_line).group(1)) if _FAILED.search(summary_line) else 0
    row["findings"] = reports.result()
    row["hydra_reports"] = sum(f["count"] for f in row["findings"] if "hydra::" in f["report"])
    row["output_tail"] = text[-3000:]
    return row


def driver(control=False) -> int:
    """initcheck's workload: hydra's decode, cache and prefill paths on fresh random inputs
    (every kernel and selection path of the test list, at its sizes), no reference
    computations. Each case runs and synchronizes on its own; one that raises is reported
    by name and the rest still run. Prints the cases that ran and those that failed.

    ``control``: instead, one case that must be reported: page summaries of a K that was
    allocated and never written (the caching allocator is off, so it is a fresh
    allocation). It shows that initcheck, as run here, sees a hydra kernel's read of
    unwritten memory; a clean driver run means something only beside it."""
    import torch

    sys.path.insert(0, str(ROOT / "torch-ext"))
    import hydra

    dev, bf16, e4m3 = "cuda", torch.bfloat16, torch.float8_e4m3fn
    g = torch.Generator(device=dev).manual_seed(20261128)

    def rnd(*shape, dtype=bf16):
        return torch.randn(*shape, device=dev, generator=g).to(dtype)

    def lens(*vals):
        return torch.tensor(vals, dtype=torch.int32, device=dev)

    cases = []

    def case(name):
        def add(fn):
            cases.append((name, fn))
            return fn
        return add

    # (name, B, Hq, Hkv, D, T, dtype, summary dtype, lengths): the fused short step (<= 1,024
    # pages), the 512-thread select (<= 4,096 candidates), the 1,024-thread one in registers
    # (<= 8,192) and in shared memory, the cluster selection fused with scoring (16-bit) and
    # after a score kernel (B = 1, Hkv = 2, D = 256; e4m3 always) (>= 16,384 pages), head
    # dims 64 and 256, fp16.
    for name, B, Hq, Hkv, D, T, dt, sd, L in (
            ("short_step", 1, 32, 8, 128, 8197, bf16, None, None),
            ("short_step_e4m3", 1, 32, 8, 128, 8197, bf16, e4m3, None),
            ("select_512", 2, 6, 2, 128, 40011, bf16, None, (40011, 20000)),
            ("select_1024_registers", 1, 8, 2, 128, 100003, bf16, None, None),
            ("select_1024_shared", 1, 4, 1, 128, 150001, bf16, None, None),
            ("cluster_fused", 2, 9, 3, 64, 300007, bf16, None, (300007, 123457)),
            ("cluster_after_scores", 1, 16, 2, 256, 300007, bf16, None, None),
            ("cluster_after_e4m3_scores", 2, 8, 2, 128, 300007, bf16, e4m3, (300007, 4000)),
            ("d64_group3", 1, 9, 3, 64, 20000, bf16, None, None),
            ("d256_fp16", 1, 16, 2, 256, 20000, torch.float16, None, None)):
        @case(name)
        def _(B=B, Hq=Hq, Hkv=Hkv, D=D, T=T, dt=dt, sd=sd, L=L):
            q, k, v = rnd(B, Hq, 1, D, dtype=dt), rnd(B, Hkv, T, D, dtype=dt), rnd(B, Hkv, T, D, dtype=dt)
            seq = lens(*L) if L else None
            summ = hydra.page_summaries(k, cache_seqlens=seq, dtype=sd)
            hydra.hydra(q, k, v, page_summaries=summ, cache_seqlens=seq)
            pages = hydra.select_pages(q, k, page_summaries=summ, cache_seqlens=seq)
            hydra.sparse_attention(q, k, v, pages, cache_seqlens=seq)

    def qkv20k():
        return rnd(2, 8, 1, 128), rnd(2, 2, 20000, 128), rnd(2, 2, 20000, 128)

    @case("stateless")
    def _():
        q, k, v = qkv20k()
        hydra.hydra(q, k, v, cache_seqlens=lens(20000, 7001))

    @case("window")
    def _():
        q, k, v = qkv20k()
        hydra.hydra(q, k, v, sliding_window=1000, cache_seqlens=lens(20000, 7001))

    @case("left_padding")
    def _():
        q, k, v = qkv20k()
        seq, pad = lens(20000, 9000), lens(0, 37)
        summ = hydra.page_summaries(k, cache_seqlens=seq, cache_leftpad=pad)
        hydra.hydra(q, k, v, page_summaries=summ, cache_seqlens=seq, cache_leftpad=pad)

    @case("coarse_to_fine")
    def _():
        q, k, v = qkv20k()
        pol = hydra.HydraPolicy(page_size=8, budget_tokens=1024, superpage=16, shortlist=2)
        s8 = hydra.page_summaries(k, page_size=8)
        hydra.hydra(q, k, v, policy=pol, page_summaries=s8, superpage_summaries=hydra.superpage_summaries(s8, 16))

    for name, summary_dtype, superpage in (("cache", "auto", 0), ("cache_coarse_e4m3", "fp8_e4m3", 16)):
        @case(name)
        def _(summary_dtype=summary_dtype, superpage=superpage):
            pol = hydra.HydraPolicy(page_size=8, budget_tokens=1024, superpage=superpage, shortlist=2,
                                    summary_dtype=summary_dtype) if superpage else None
            cache = hydra.HydraKVCache(2, 2, 128, 20000, device=dev, policy=pol)
            cache.prefill(rnd(2, 2, 9000, 128), rnd(2, 2, 9000, 128), seqlens=lens(9000, 5003))
            for _ in range(3):
                cache.step(rnd(2, 8, 1, 128), rnd(2, 2, 1, 128), rnd(2, 2, 1, 128))
            cache.append(rnd(2, 2, 5, 128), rnd(2, 2, 5, 128))
            cache.attend(rnd(2, 8, 1, 128))

    for name, D, prec in (("prefill", 128, "high"), ("prefill_exact", 128, "exact"), ("prefill_d256", 256, "high")):
        @case(name)
        def _(D=D, prec=prec):
            hydra.hydra(rnd(1, 8, 4160, D), rnd(1, 2, 4160, D), rnd(1, 2, 4160, D), precision=prec)

    if control:  # only the case initcheck must report
        def unwritten_k():
            hydra.page_summaries(torch.empty(1, 2, 4104, 128, device=dev, dtype=bf16))

        cases = [("control_unwritten_k", unwritten_k)]
    ok, failed = [], []
    for name, fn in cases:
        try:
            fn()
            torch.cuda.synchronize()
            ok.append(name)
        except Exception as e:  # noqa: BLE001 - reported by name; the other cases still run
            failed.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")
    print(f"driver: {len(ok)} cases ok: {', '.join(ok)}", flush=True)
    if failed:
        print(f"driver: {len(failed)} cases failed: {'; '.join(failed)}", flush=True)
    return 1 if failed else 0


def carried(path, tools, digest, device) -> dict:
    """An earlier run's evidence (``--carry``), checked: this script's, of the same sources
    and device. The rows of tools that run again here are left out (this run's replace
    them)."""
    from hydra.evidence import read_evidence

    e = read_evidence(path)
    problems = []
    if e.get("kind") != "sanitizer":
        problems.append(f"kind is {e.get('kind')!r}, not 'sanitizer'")
    if e.get("source_digest") != digest:
        problems.append(f"source_digest {e.get('source_digest')!r} is not this tree's {digest!r}")
    if e.get("device") != device:
        problems.append(f"device {e.get('device')!r} is not this run's {device!r}")
    if problems:
        sys.exit(f"scripts/sanitize.py: --carry {path}: " + "; ".join(problems))
    # a tool run here again replaces its earlier row
    e = dict(e, rows=[r for r in e.get("rows", []) if r["tool"] not in tools],
             tests_by_tool={t: v for t, v in e.get("tests_by_tool", {}).items() if t not in tools})
    return e


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "evidence" / "sanitizer.json"))
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, from " + ", ".join(TOOLS))
    ap.add_argument("--limit-s", type=float, default=None,
                    help="wall-clock limit for every tool's run (default: LIMITS, per tool)")
    ap.add_argument("--tests", nargs="*", default=None, help="pytest node ids (default: TESTS)")
    ap.add_argument("--log-dir", default=os.environ.get("LOGS", "/tmp/hydra_logs"),
                    help="where each tool's whole output is written (sanitize_TOOL.log)")
    ap.add_argument("--no-coverage", action="store_true", help="skip the coverage pass")
    ap.add_argument("--driver", action="store_true", help="run initcheck's workload (no sanitizer, no evidence)")
    ap.add_argument("--control", action="store_true", help="with --driver: only the case initcheck must report")
    ap.add_argument("--carry", default=None,
                    help="an earlier sanitizer.json of the same sources and device: its tools' rows join this file")
    args = ap.parse_args()
    if args.driver:
        return driver(args.control)

    tools = [t for t in args.tools.split(",") if t]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        ap.error(f"--tools: unknown tool(s) {bad}; choose from {list(TOOLS)}")
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not Path(sanitizer).exists():
        sys.exit("scripts/sanitize.py: compute-sanitizer not found on PATH or in /usr/local/cuda/bin")
    tests = args.tests or TESTS
    env = dict(os.environ, PYTHONUNBUFFERED="1", HYDRA_KERNEL_PROBE="0", PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    sys.path.insert(0, str(ROOT / "torch-ext"))
    from hydra.evidence import device_info, source_digest, write_evidence

    earlier = carried(args.carry, tools, source_digest(), device_info()["device"]) if args.carry else None
    if args.no_coverage and earlier is not None:
        per_test, cov_rc = earlier["kernels_by_test"], earlier["coverage_pytest_exit_status"]
    else:
        per_test, cov_rc = ({}, None) if args.no_coverage else coverage(tests, env)
    launched = sorted({k for ks in per_test.values() for k in ks})
    defined = defined_kernels()
    uncovered = [k for k in defined if k not in launched]
    print(f"coverage pass: pytest exit {cov_rc}; kernels launched {launched}; not launched {uncovered}", flush=True)

    rows = []
    # what each tool runs: the test ids, or initcheck's driver
    runs = {t: ["scripts/sanitize.py --driver"] if t == "initcheck" else args.tests or TOOL_TESTS.get(t, TESTS)
            for t in tools}
    for tool in tools:
        row = run_tool(tool, runs[tool], env, args.limit_s or LIMITS[tool], sanitizer, args.log_dir)
        if tool == "initcheck":
            # the positive control: the same tool, as run here, must report hydra's read of
            # memory nothing wrote
            ctl = run_tool(tool, runs[tool], env, args.limit_s or LIMITS[tool], sanitizer, args.log_dir, control=True)
            row["control"] = {"case": "page_summaries of a K never written", "finished": ctl["finished"],
                              "wall_s": ctl["wall_s"], "hydra_reports": ctl["hydra_reports"],
                              "findings": ctl["findings"][:4]}
        rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("output_tail", "findings")}
        shown["findings"] = row["findings"][:8]
        print(json.dumps(shown), flush=True)

    version = subprocess.run([sanitizer, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    for r in rows:
        # clean: finished, every test passed, and no report (initcheck, which checks torch's
        # kernels too: none in hydra's; its error count is all of them)
        r["clean"] = bool(r["finished"] and r["failed"] == 0 and r["passed"] == r["tests"]
                          and (r.get("errors") == 0 or (r["tool"] == "initcheck" and r["hydra_reports"] == 0
                                                        and r.get("errors") is not None))
                          and (r["tool"] != "initcheck" or r["control"]["hydra_reports"] > 0))
    if earlier is not None:
        rows = [dict(r, run={"command": earlier["command"], "created": earlier["created"]})
                for r in earlier["rows"]] + rows
        runs = {**earlier["tests_by_tool"], **runs}
    clean = all(r["clean"] for r in rows)
    summary = {"tools": len(rows), "clean": sum(r["clean"] for r in rows),
               "kernels_defined": len(defined), "kernels_launched": len(launched)}
    write_evidence(args.out, kind="sanitizer", command="python3 scripts/sanitize.py " + " ".join(sys.argv[1:]),
                   summary=summary, rows=rows,
                   extra={"sanitizer": version[-1] if version else None, "tests": tests,
                          "tests_by_tool": runs,
                          "coverage_pytest_exit_status": cov_rc, "kernels_defined": defined,
                          "kernels_launched": launched, "kernels_not_launched": uncovered,
                          "kernels_by_test": per_test})
    print(json.dumps(summary))
    return 0 if clean and cov_rc in (0, None) and not uncovered else 1


if __name__ == "__main__":
    sys.exit(main())
