"""The whole GPU check in one call: the full test suite plus a short decode smoke
benchmark, written as one evidence file (SPEC section 6).

    python3 scripts/run_gpu_suite.py --out evidence/gpu_tests.json [-- pytest args]

The test counts come from pytest run in a subprocess (tests/conftest.py records
them when HYDRA_EVIDENCE_JSON is set); the smoke rows time hydra against torch's
SDPA (flash backend) at a few shapes, CUDA-graph replay, medians of
``triton.testing.do_bench``, and check each hydra output against the reference
over the pages hydra selected. Exits non-zero if any test failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "torch-ext"))


def run_tests(pytest_args):
    with tempfile.TemporaryDirectory() as tmp:
        counts_path = Path(tmp) / "counts.json"
        env = dict(os.environ, HYDRA_EVIDENCE_JSON=str(counts_path), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", *pytest_args]
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        data = json.loads(counts_path.read_text()) if counts_path.exists() else {}
    return rc, data.get("summary", {"passed": 0, "failed": 1, "skipped": 0}), data.get("failing", [])


def smoke_bench():
    import torch

    import hydra

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from timing import graph_us

    rows = []
    Hq, Hkv, D = 32, 8, 128
    for B, T in ((1, 32768), (1, 131072)):
        g = torch.Generator(device="cuda").manual_seed(T)
        q = torch.randn(B, Hq, 1, D, device="cuda", generator=g).to(torch.bfloat16)
        k = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(torch.bfloat16)
        v = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(torch.bfloat16)
        summ = hydra.page_summaries(k)
        out = torch.empty_like(q)
        hydra_us = graph_us(lambda: hydra.hydra(q, k, v, page_summaries=summ, out=out))
        pages = hydra.select_pages(q, k, page_summaries=summ)
        o_ref = hydra.reference.sparse_attention(q, k, v, pages, page_size=16)
        err = ((out.double() - o_ref.double()).norm() / o_ref.double().norm()).item()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def dense():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        try:
            dense_us = graph_us(dense)
        except Exception as e:  # a backend that refuses the shape is reported, not fatal
            print(f"sdpa_flash skipped at B={B} T={T}: {e}", file=sys.stderr)
            dense_us = None
        rows.append({"name": "hydra_cached", "B": B, "T": T, "D": D, "mode": "graph", "us": round(hydra_us, 2),
                     "sdpa_flash_us": None if dense_us is None else round(dense_us, 2),
                     "speedup_vs_sdpa_flash": None if dense_us is None else round(dense_us / hydra_us, 2),
                     "max_rel_err": err})
        del q, k, v, summ
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "evidence" / "gpu_tests.json"))
    ap.add_argument("--no-bench", action="store_true", help="skip the smoke benchmark")
    ap.add_argument("pytest_args", nargs="*", default=["tests"])
    args = ap.parse_args()

    rc, summary, failing = run_tests(args.pytest_args or ["tests"])
    rows = [] if args.no_bench else smoke_bench()
    from hydra.evidence import write_evidence

    command = "python3 scripts/run_gpu_suite.py " + " ".join(sys.argv[1:])
    write_evidence(args.out, kind="gpu_tests", command=command.strip(), summary=summary, rows=rows,
                   extra={"failing": failing, "pytest_exit_status": rc})
    print(json.dumps({"summary": summary, "failing": failing, "rows": rows}, indent=1))
    return 0 if rc == 0 and summary.get("failed", 1) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
