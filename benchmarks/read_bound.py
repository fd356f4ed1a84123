#!/usr/bin/env python3
"""The fastest any decode step could be in the decode benchmark's own harness.

A hydra step must at least read its bytes (the page summaries and the selected K/V, as
``benchmark_hydra_decode.py`` counts them). This times one plain read of exactly that
many bytes (a Triton kernel that loads and sums int32, captured in a CUDA graph),
with the same ``triton.testing.do_bench`` median the benchmark uses (it zeroes a 256 MB
buffer before every call, which leaves L2 full of dirty lines), and times the dense
peers (SDPA flash and cuDNN, ``enable_gqa=True``) on the same shapes in the same run.

    bound = best dense peer (us) / plain read of the step's bytes (us)

is then an upper bound on the speedup over the best dense peer that any step reading
those bytes could show in this harness, however its kernels are built: a step of
several dependent kernels only adds to one read. A target above its bound cannot be
met with that budget and page size under do_bench (benchmarks/NOTES.md v15, v18).

Writes ``evidence/read_bound.json`` (SPEC section 6 shape) and prints a table.

    python3 benchmarks/read_bound.py --out evidence/read_bound.json
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import benchmark_hydra_decode as bench  # noqa: E402  (shapes, targets and byte counts)

PAGE, BUDGET = bench.PAGE_SIZE, bench.BUDGET_TOKENS


def load_write_evidence():
    # evidence.py stands alone: the digest covers this checkout without building hydra.
    spec = importlib.util.spec_from_file_location("hydra_checkout_evidence",
                                                  REPO / "torch-ext" / "hydra" / "evidence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_evidence


def cases():
    """(label, B, T, Hq, Hkv, D, target, {summaries: bytes})."""
    out = []
    for B, T in bench.SPEC_SHAPES:
        out.append(("hydra_cached", B, T, 32, 8, 128, bench.TARGET_SPEEDUP[(B, T)],
                    {"16-bit": bench.step_bytes("hydra_cached", B, T),
                     "e4m3": bench.step_bytes("hydra_cached_e4m3", B, T)}))
    # Issue 9's rows: summaries + selected K/V, as the benchmark counts them there.
    for Hq, Hkv, D in ((9, 3, 64), (16, 2, 256)):
        T = 131072
        sel = BUDGET * Hkv * D * 2
        out.append(("hydra_cached", 1, T, Hq, Hkv, D, 8.0,
                    {"16-bit": Hkv * -(-T // PAGE) * 2 * D * 2 + 2 * sel,
                     "e4m3": Hkv * -(-T // PAGE) * 2 * D + 2 * sel}))
    # Issue 6's coarse-to-fine rows (8-token pages under superpages of 16).
    for T, target in ((131072, 8.0), (1048576, 20.0)):
        out.append(("hydra_hier", 1, T, 32, 8, 128, target,
                    {"16-bit": bench.hier_step_bytes("hydra_hier", 1, T),
                     "e4m3": bench.hier_step_bytes("hydra_hier_e4m3", 1, T)}))
    return out


def graph_us(fn, rep_ms):
    """do_bench median of fn's graph replay, captured as the decode benchmark captures."""
    graph, _ = bench.capture_graph(fn)
    return bench.do_bench_us(graph.replay, rep_ms)


@triton.jit
def read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Load int32 and store one sum a program: a plain read."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + pid, tl.sum(x, axis=0))


def plain_read_us(nbytes, rep_ms):
    block = 8192
    n = -(-nbytes // 4)
    x = torch.randint(-1000, 1000, (n,), dtype=torch.int32, device="cuda")  # never zeros
    out = torch.full((-(-n // block),), -1, dtype=torch.int32, device="cuda")
    us = graph_us(lambda: read_kernel[(out.numel(),)](x, out, n, BLOCK=block), rep_ms)
    want, got = x.sum().item(), out.sum().item()
    if got != want:  # the kernel must really have read every element
        raise RuntimeError(f"read kernel summed {got}, expected {want}")
    return us


def dense_us(B, T, Hq, Hkv, D, rep_ms):
    from torch.nn.attention import SDPBackend

    g = torch.Generator(device="cuda").manual_seed(B * 7 + T)
    q = torch.randn(B, Hq, 1, D, device="cuda", generator=g, dtype=bench.DTYPE)
    k = torch.randn(B, Hkv, T, D, device="cuda", generator=g, dtype=bench.DTYPE)
    v = torch.randn(B, Hkv, T, D, device="cuda", generator=g, dtype=bench.DTYPE)
    want = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float(), enable_gqa=True)
    res = {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        fn = bench.sdpa_call(backend, q, k, v, "gqa")
        try:
            o = fn()
            torch.cuda.synchronize()
            err = ((o[:1].float() - want).abs().max() / want.abs().max()).item()
            if not err < bench.MAX_REL_ERR:
                raise RuntimeError(f"rel err {err:.2e}")
            res[name] = graph_us(fn, rep_ms)
        except Exception as e:  # a backend that refuses the shape is left out
            print(f"  {name} B={B} T={T} D={D}: skipped ({str(e).splitlines()[0][:120]})", flush=True)
    del q, k, v
    torch.cuda.empty_cache()
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "evidence" / "read_bound.json"))
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time in ms")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("read_bound: needs a CUDA GPU")
    rows, reads = [], {}
    for label, B, T, Hq, Hkv, D, target, variants in cases():
        peers = dense_us(B, T, Hq, Hkv, D, args.rep)
        if not peers:
            continue
        best_name = min(peers, key=peers.get)
        for summ, nbytes in variants.items():
            if nbytes not in reads:
                reads[nbytes] = plain_read_us(nbytes, args.rep)
            bound = peers[best_name] / reads[nbytes]
            rows.append({"name": "read_bound", "step": label, "summaries": summ, "B": B, "T": T, "Hq": Hq,
                         "Hkv": Hkv, "D": D, "bytes": nbytes, "plain_read_us": reads[nbytes],
                         "best_dense_us": peers[best_name], "best_dense_name": best_name, "peers_us": peers,
                         "bound_speedup": bound, "target_speedup": target, "target_within_bound": bound >= target})
            print(f"{label:13s} {summ:6s} B={B:2d} T={T:8d} D={D:3d}  {nbytes / 1e6:8.1f} MB  read "
                  f"{reads[nbytes]:8.1f} us  dense {peers[best_name]:8.1f} us ({best_name})  bound "
                  f"{bound:5.2f}x  target {target:4.1f}x  {'within' if bound >= target else 'ABOVE'}", flush=True)
    write_evidence = load_write_evidence()
    write_evidence(args.out, kind="read_bound", command=[Path(sys.executable).name] + sys.argv, rows=rows,
                   extra={"method": "bound = best dense peer / do_bench median of one graph-replayed plain read "
                                    "(Triton, int32 loads summed) of the step's bytes; do_bench zeroes 256 MB "
                                    "before every call, as in the decode benchmark"})
    print("\n| step | summaries | B | T | D | MB read | plain read (us) | best dense (us) | bound | target |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['summaries']} | {r['B']} | {r['T']:,} | {r['D']} | {r['bytes'] / 1e6:.1f} | "
              f"{r['plain_read_us']:.1f} | {r['best_dense_us']:.1f} ({r['best_dense_name']}) | "
              f"{r['bound_speedup']:.2f}x | {r['target_speedup']:.1f}x{'' if r['target_within_bound'] else ' (above)'} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
