"""CPU checks of benchmarks/read_bound.py: each row reads the bytes the decode benchmark
counts for the same step, and the README table marks exactly the targets beyond their bound."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # read_bound defines its plain-read kernel at import
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import benchmark_hydra_decode as bench  # noqa: E402
import read_bound  # noqa: E402
import render_readme  # noqa: E402


def test_rows_cover_every_target_with_the_benchmarks_bytes():
    rows = read_bound.cases()
    flat = {(B, T): (target, v) for label, B, T, Hq, Hkv, D, target, v in rows if label == "hydra_cached" and D == 128}
    assert set(flat) == set(bench.SPEC_SHAPES)
    for (B, T), (target, v) in flat.items():
        assert target == bench.TARGET_SPEEDUP[(B, T)]
        assert v["16-bit"] == bench.step_bytes("hydra_cached", B, T)
        assert v["e4m3"] == bench.step_bytes("hydra_cached_e4m3", B, T)
        # e4m3 halves the summaries only: the selected K/V stay 16-bit.
        kv = 2 * B * 8 * min(T, bench.BUDGET_TOKENS) * 128 * 2
        summaries16 = B * 8 * -(-T // bench.PAGE_SIZE) * 2 * 128 * 2
        assert v["16-bit"] - v["e4m3"] == summaries16 // 2
        assert v["16-bit"] >= kv + summaries16
    # Issue 9's shapes: (Hq, Hkv, D) = (9, 3, 64) and (16, 2, 256) at 131,072 tokens.
    dims = {(Hq, Hkv, D) for label, B, T, Hq, Hkv, D, *_ in rows if D != 128}
    assert dims == {(9, 3, 64), (16, 2, 256)}
    hier = {T: v for label, B, T, *_, v in rows if label == "hydra_hier"}
    assert hier[1048576]["16-bit"] == bench.hier_step_bytes("hydra_hier", 1, 1048576)


def test_bound_table_marks_targets_beyond_the_bound():
    record = {"device": "GPU X", "created": "2026-11-27T00:00:00Z", "command": "python3 benchmarks/read_bound.py",
              "rows": [{"step": "hydra_cached", "summaries": "16-bit", "B": 1, "T": 131072, "Hq": 32, "Hkv": 8,
                        "D": 128, "bytes": 50_350_000, "plain_read_us": 27.8, "best_dense_us": 193.2,
                        "best_dense_name": "sdpa_cudnn", "bound_speedup": 193.2 / 27.8, "target_speedup": 8.0},
                       {"step": "hydra_cached", "summaries": "e4m3", "B": 1, "T": 131072, "Hq": 32, "Hkv": 8,
                        "D": 128, "bytes": 33_570_000, "plain_read_us": 20.6, "best_dense_us": 193.2,
                        "best_dense_name": "sdpa_cudnn", "bound_speedup": 193.2 / 20.6, "target_speedup": 8.0}]}
    text = render_readme.bound_section(record, Path("evidence/read_bound.json"), stale=False)
    lines = [line for line in text.splitlines() if line.startswith("| hydra_cached")]
    assert len(lines) == 2
    assert "6.95x" in lines[0] and "(beyond the bound)" in lines[0]
    assert "9.38x" in lines[1] and "(beyond the bound)" not in lines[1]
    assert "GPU X" in text and "current with the sources" in text
