#!/usr/bin/env python3
"""Time one hydra decode step against the fastest dense peers, in one run on one GPU.

SPEC section 7 (and issue 3, scope item 5). For each shape (B, T) of the SPEC
matrix, with Hq=32, Hkv=8, D=128, bf16 and precision "high" (budget 4096 tokens,
pages of 16), this times

* ``hydra_cached``     hydra.hydra with page summaries precomputed by hydra.page_summaries
* ``hydra_stateless``  hydra.hydra with page_summaries=None (reads all of K)
* ``sdpa_flash``       torch SDPA inside sdpa_kernel(SDPBackend.FLASH_ATTENTION)
* ``sdpa_cudnn``       torch SDPA inside sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
* ``flashinfer``       flashinfer.BatchDecodeWithPagedKVCacheWrapper (dense), when importable

both eagerly and as CUDA-graph replays, with ``triton.testing.do_bench``
(median; it also clears L2 before every timed call), on inputs rotated over up
to 4 sets so that no set stays in L2. Every timed case is checked against the
fp32 reference (``hydra.reference``) on a sub-batch of the same inputs.

The eager host overhead (SPEC 7: hydra_cached at B=1, T=8192, under 15 us) is
eager minus graph where each is the device time per call over 200 calls issued
back to back (the median of five such trials): do_bench's own eager figure hides
host time behind the L2 clear it issues before every call. Both figures go into
the JSON.

Byte floors use a device-to-device copy bandwidth measured in the same run
(bytes read + written over time, decimal GB/s):

* hydra_cached    = summaries read (B*Hkv*ceil(T/P)*2*D elements) + selected K/V
                    (B*Hkv*min(T, budget)*D, K and V) + q + out
* hydra_stateless = all of K + selected V + q + out
* dense peers     = all of K and V + q + out

Peers, exactly as called (K, V are contiguous ``(B, Hkv, T, D)``; nothing is
copied inside the timed region):

* SDPA, variant "gqa":  ``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)``
  with q ``(B, Hq, 1, D)``.
* SDPA, variant "fold": ``F.scaled_dot_product_attention(q.view(B, Hkv, G, D), k, v)``,
  the G = Hq/Hkv query heads of a group as G query rows of one KV head (no mask:
  decode attends to every key), the same trick FlashAttention uses for GQA decode.
  Each backend is tried with both variants; a variant the backend refuses is
  recorded with its reason, and the row reports the faster working variant.
* FlashInfer: ``BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="HND")``
  planned once per shape with pages of 16 tokens, and run on a strided view of
  the cache: ``k.as_strided((N, Hkv, 16, D), (16*D, T*D, D, 1))``, so that page
  ``b*Hkv*T/16 + j`` is tokens ``16j .. 16j+15`` of sequence ``b``, every head
  (FlashInfer reads the page, head and token strides from the tensor). With
  ``--flashinfer-tensor-cores`` the same wrapper with ``use_tensor_cores=True``
  is timed too, and the row keeps the faster.

Usage (from the repository root)::

    python3 benchmarks/benchmark_hydra_decode.py                      # full SPEC 7 matrix
    python3 benchmarks/benchmark_hydra_decode.py --shapes 1x8192,1x131072 --out /tmp/x.json
    python3 benchmarks/benchmark_hydra_decode.py --quick              # 2 shapes, short reps

Environment:

* ``FLASHINFER_CUDA_ARCH_LIST``  must be set when FlashInfer JIT-compiles its
  kernels (first use on a machine, a minute or two). If unset, this script sets
  it to the GPU's compute capability ("9.0" on H100/H200) before importing
  flashinfer.
* ``TVM_FFI_DISABLE_TORCH_C_DLPACK=1``  (optional) stops apache-tvm-ffi 0.1.4
  from JIT-building its torch DLPack addon at ``import flashinfer`` when torch
  lacks ``__c_dlpack_exchange_api__``; FlashInfer then converts tensors through
  ``torch.utils.dlpack`` (a little more host time per eager call, the same
  kernels and the same CUDA-graph times). Unset, the build runs once per machine.
* ``HYDRA_USE_HUB=1``  load hydra with ``kernels.get_kernel("Frosty40/hydra",
  version=1)`` instead of the source checkout (``torch-ext/``).

On a machine without network, FlashInfer travels as wheels in ``.whl/``
(flashinfer-python 0.5.3, apache-tvm-ffi 0.1.x, nvidia-cudnn-frontend); install
them first with ``python3 -m pip install -q --no-index --no-deps --target
/tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import math
import os
import statistics
import sys
import traceback
import warnings
from pathlib import Path

# Whether the user chose FlashInfer's architectures; otherwise load_flashinfer()
# sets them from the device before `import flashinfer`.
_FLASHINFER_ARCH_FROM_USER = "FLASHINFER_CUDA_ARCH_LIST" in os.environ

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from render_readme import decode_detail_table, decode_summary_table  # noqa: E402
from timing import back_to_back_us, capture_graph, rotating  # noqa: E402,F401 (read_bound uses capture_graph)

# ----------------------------------------------------------------------------
# The SPEC 7 matrix and the "high" preset of SPEC 2
# ----------------------------------------------------------------------------
HQ, HKV, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
PRECISION = "high"
PAGE_SIZE = 16
BUDGET_TOKENS = 4096
SINK_TOKENS = 64
RECENT_TOKENS = 512

SPEC_SHAPES = [(1, 8192), (1, 32768), (1, 131072), (1, 524288), (8, 131072), (32, 32768)]
QUICK_SHAPES = [(1, 8192), (1, 131072)]
# hydra_cached, graph replay: speedup over the best dense peer in the same mode
TARGET_SPEEDUP = {(1, 8192): 1.3, (1, 32768): 3.5, (1, 131072): 8.0, (1, 524288): 10.0,
                  (8, 131072): 8.0, (32, 32768): 4.5}
TARGET_STATELESS_SPEEDUP = {(1, 131072): 1.8}
TARGET_FLOOR_RATIO = 1.25          # hydra_cached us / floor_us, at T >= FLOOR_MIN_T
FLOOR_MIN_T = 131072
TARGET_HOST_OVERHEAD_US = 15.0     # hydra_cached eager minus graph at HOST_OVERHEAD_SHAPE
HOST_OVERHEAD_SHAPE = (1, 8192)
MAX_REL_ERR = 2e-2

DEVICE = torch.device("cuda")

HYDRA_NAMES = ("hydra_cached", "hydra_cached_e4m3", "hydra_stateless")
# hydra_cached_e4m3: the same call with e4m3 page summaries (HydraPolicy.summary_dtype="fp8_e4m3",
# hydra.page_summaries(k, dtype=torch.float8_e4m3fn)): half the summary bytes.
E4M3 = torch.float8_e4m3fn
PEER_NAMES = ("sdpa_flash", "sdpa_cudnn", "flashinfer")

# HydraKVCache step rows (issue 5): shapes, cache headroom for the timed appends, targets
CACHE_STEP_MIN_T = 131072
CACHE_STEP_MAX_B = 8
CACHE_HEADROOM = 32768        # tokens past T: every timed call appends one
TARGET_STEP_OVER_ATTEND = 1.10
TARGET_APPEND_SHARE = 0.05

# Coarse-to-fine rows (issue 6): flat selection over 8-token pages against coarse-to-fine
# with the same fine pages (superpages of 16 pages = 128 tokens, a shortlist of 4x the budget).
HIER_SHAPES = [(1, 131072), (1, 524288), (1, 1048576), (8, 262144)]
HIER_PAGE, HIER_SUPERPAGE, HIER_SHORTLIST = 8, 16, 4
TARGET_HIER = {(1, 131072): {"speedup_vs_best_dense": 8.0, "floor_ratio": 1.25},
               (1, 1048576): {"speedup_vs_best_dense": 20.0, "speedup_vs_flat": 1.5}}

SET_BYTES_CAP = 2e9        # rotate several input sets only while they total less than this
FLASHINFER_PAGE = 16
FLASHINFER_WORKSPACE = 256 << 20


def log(msg: str = "") -> None:
    print(msg, flush=True)


def short_reason(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def parse_shapes(text: str):
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            b, t = item.split("x")
            shapes.append((int(b), int(t)))
        except ValueError:
            raise SystemExit(f"--shapes: expected BxT items like 1x8192, got {item!r}")
    if not shapes:
        raise SystemExit("--shapes: no shapes given")
    return shapes


# ----------------------------------------------------------------------------
# Loading hydra, its reference, the evidence writer and FlashInfer
# ----------------------------------------------------------------------------
def load_hydra():
    """(hydra module, hydra.reference module, description of where it came from)."""
    if os.environ.get("HYDRA_USE_HUB") == "1":
        from kernels import get_kernel

        mod = get_kernel("Frosty40/hydra", version=1)
        source = "hub:Frosty40/hydra version=1"
    else:
        sys.path.insert(0, str(REPO / "torch-ext"))
        import hydra as mod

        source = f"checkout:{REPO / 'torch-ext'}"
    ref = getattr(mod, "reference", None)
    if ref is None:
        ref = importlib.import_module(mod.__name__ + ".reference")
    return mod, ref, source


def load_write_evidence():
    if os.environ.get("HYDRA_USE_HUB") == "1":
        # evidence.py stands alone; load it from the checkout so that the digest
        # covers this tree, without importing (and building) the source package.
        spec = importlib.util.spec_from_file_location(
            "hydra_checkout_evidence", REPO / "torch-ext" / "hydra" / "evidence.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.write_evidence
    from hydra.evidence import write_evidence

    return write_evidence


def load_flashinfer():
    """(flashinfer module or None, version or skip reason)."""
    if not _FLASHINFER_ARCH_FROM_USER:
        major, minor = torch.cuda.get_device_capability()
        os.environ["FLASHINFER_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    try:
        import flashinfer
    except Exception as e:  # not installed, or a broken install: the peer is skipped
        return None, f"import flashinfer failed ({short_reason(e, 200)})"
    return flashinfer, getattr(flashinfer, "__version__", "unknown")


# ----------------------------------------------------------------------------
# Byte counts (decimal GB everywhere)
# ----------------------------------------------------------------------------
def qo_bytes(B: int) -> int:
    return 2 * B * HQ * HEAD_DIM * 2  # q read + out written, bf16


def kv_bytes(B: int, tokens: int) -> int:
    """K or V of `tokens` tokens per (sequence, KV head), bf16."""
    return B * HKV * tokens * HEAD_DIM * 2


def summary_bytes(B: int, T: int, elem_size: int = 2) -> int:
    return B * HKV * ceil_div(T, PAGE_SIZE) * 2 * HEAD_DIM * elem_size


def step_bytes(name: str, B: int, T: int, summary_elem: int = 2) -> int:
    sel = min(T, BUDGET_TOKENS)
    if name == "hydra_cached":
        return summary_bytes(B, T, summary_elem) + 2 * kv_bytes(B, sel) + qo_bytes(B)
    if name == "hydra_cached_e4m3":
        return summary_bytes(B, T, 1) + 2 * kv_bytes(B, sel) + qo_bytes(B)
    if name == "hydra_stateless":
        return kv_bytes(B, T) + kv_bytes(B, sel) + qo_bytes(B)
    return 2 * kv_bytes(B, T) + qo_bytes(B)


def hier_policies(hydra):
    flat = hydra.HydraPolicy(page_size=HIER_PAGE, budget_tokens=BUDGET_TOKENS, sink_tokens=SINK_TOKENS,
                             recent_tokens=RECENT_TOKENS)
    hier = hydra.HydraPolicy(page_size=HIER_PAGE, budget_tokens=BUDGET_TOKENS, sink_tokens=SINK_TOKENS,
                             recent_tokens=RECENT_TOKENS, superpage=HIER_SUPERPAGE, shortlist=HIER_SHORTLIST)
    return flat, hier


def hier_step_bytes(name: str, B: int, T: int) -> int:
    """Bytes a step must read: flat = all 8-token page summaries + the selected K/V;
    coarse-to-fine = superpage summaries + the shortlisted pages' summaries + the selected K/V
    (e4m3 rows: one byte a summary value)."""
    sel = min(T, BUDGET_TOKENS)
    n_pages = ceil_div(T, HIER_PAGE)
    per_summary = 2 * HEAD_DIM * (1 if name.endswith("_e4m3") else 2)
    if name.startswith("hydra_flat8"):
        meta = n_pages
    else:
        n_sel = BUDGET_TOKENS // HIER_PAGE
        n_short = ceil_div(HIER_SHORTLIST * n_sel, HIER_SUPERPAGE)
        meta = ceil_div(n_pages, HIER_SUPERPAGE) + min(n_short * HIER_SUPERPAGE, n_pages)
    return B * HKV * meta * per_summary + 2 * kv_bytes(B, sel) + qo_bytes(B)


def gbps(nbytes: int, us):
    return None if not us else nbytes / (us * 1e-6) / 1e9


def floor_us(nbytes: int, copy_gbps: float) -> float:
    return nbytes / (copy_gbps * 1e9) * 1e6


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------
def do_bench_us(fn, rep_ms: int, warmup_ms: int = 25) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def measure_copy_gbps(rep_ms: int) -> dict:
    """Device-to-device copy of 1 GiB: bytes read + written per second, decimal GB/s."""
    n = (1 << 30) // 2
    src = torch.randn(n, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    us = do_bench_us(lambda: dst.copy_(src), rep_ms)
    nbytes = 2 * src.numel() * src.element_size()
    return {"copy_bytes": nbytes, "copy_us": us, "copy_gbps": nbytes / (us * 1e-6) / 1e9}


# ----------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------
def rel_errs(out: torch.Tensor, ref: torch.Tensor):
    """Per-sequence ||out - ref|| / ||ref||; None where out is not finite."""
    o = out.float().reshape(out.shape[0], -1)
    r = ref.float().reshape(ref.shape[0], -1).to(o.device)
    if not torch.isfinite(o).all():
        return None
    return ((o - r).norm(dim=1) / r.norm(dim=1).clamp_min(1e-30)).tolist()


def max_rel_err(out, ref):
    errs = rel_errs(out, ref)
    return None if errs is None else max(errs)


def dense_reference(q, k, v):
    """fp32 softmax(q k^T / sqrt(D)) v over every key; q (b, Hq, 1, D), k, v (b, Hkv, T, D)."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    outs = []
    for i in range(b):  # one sequence at a time bounds the fp32 copies
        qf = q[i].float().view(hkv, hq // hkv, d)
        s = torch.matmul(qf, k[i].float().transpose(-1, -2)) / math.sqrt(d)
        outs.append(torch.matmul(torch.softmax(s, dim=-1), v[i].float()).reshape(hq, 1, d))
    return torch.stack(outs)


def forced_page_mask(T: int, n_pages: int, device) -> torch.Tensor:
    """Sink and recent pages of SPEC 2.3 for a sequence of valid length T."""
    page = torch.arange(n_pages, device=device)
    sink = page < ceil_div(SINK_TOKENS, PAGE_SIZE)
    lo = max(0, T - RECENT_TOKENS)
    recent = (page * PAGE_SIZE < T) & ((page + 1) * PAGE_SIZE > lo)
    return sink | recent


def page_list_mask(pages: torch.Tensor, n_pages: int) -> torch.Tensor:
    """(b, Hkv, n) int page lists (-1 padded) -> (b, Hkv, n_pages) bool."""
    slot = torch.where(pages >= 0, pages.long(), torch.full_like(pages, n_pages, dtype=torch.long))
    mask = torch.zeros((*pages.shape[:-1], n_pages + 1), dtype=torch.bool, device=pages.device)
    mask.scatter_(-1, slot, True)
    return mask[..., :n_pages]


def check_selection(pages_kernel, pages_ref, scores, T: int) -> dict:
    """Kernel page lists against the reference's, allowing near-ties (SPEC 2).

    Sets may differ only where the scores are within relative 1e-3: every page
    the kernel chose that the reference did not must score at least the best
    page the reference chose instead, less 1e-3 relative. Also checks list
    shape, ascending order, range, no duplicates and that sink and recent pages
    are present.
    """
    n_pages = scores.shape[-1]
    pk = pages_kernel.to(scores.device).long()
    pr = pages_ref.to(scores.device).long()
    problems = []
    if pk.shape != pr.shape:
        problems.append(f"list shape {tuple(pk.shape)} != reference {tuple(pr.shape)}")
    valid = pk >= 0
    if ((pk < -1) | (pk >= n_pages)).any():
        problems.append("page index out of range")
    pk = pk.clamp(-1, n_pages - 1)
    # Ascending, -1 only at the end, hence strictly increasing over the valid prefix.
    if pk.shape[-1] > 1:
        nxt_valid = valid[..., 1:]
        if (nxt_valid & ~valid[..., :-1]).any():
            problems.append("-1 padding before a page index")
        if ((pk[..., 1:] <= pk[..., :-1]) & nxt_valid).any():
            problems.append("page lists not strictly ascending (or duplicates)")
    mk, mr = page_list_mask(pk, n_pages), page_list_mask(pr, n_pages)
    if (forced_page_mask(T, n_pages, scores.device) & ~mk).any():
        problems.append("a sink or recent page is missing")
    only_k, only_r = mk & ~mr, mr & ~mk
    inf = torch.tensor(float("inf"), device=scores.device)
    worst_k = torch.where(only_k, scores, inf).amin(dim=-1)
    best_r = torch.where(only_r, scores, -inf).amax(dim=-1)
    tie_ok = (worst_k >= best_r - 1e-3 * best_r.abs()) | ~only_r.any(dim=-1)
    if (mk.sum(-1) != mr.sum(-1)).any():
        problems.append("selected page counts differ from the reference")
    if not bool(tie_ok.all()):
        problems.append("a chosen page scores below an omitted one beyond 1e-3 relative")
    differing = (only_k.any(-1) | only_r.any(-1)).float().mean().item()
    return {"selection_ok": not problems, "selection_rows_differing": differing,
            "selection_problems": problems}


# ----------------------------------------------------------------------------
# One shape
# ----------------------------------------------------------------------------
def choose_n_sets(B: int, T: int, l2_bytes: int, forced=None) -> int:
    if forced:
        return forced
    hydra_read = step_bytes("hydra_cached", B, T)
    set_bytes = 2 * kv_bytes(B, T) + summary_bytes(B, T) + qo_bytes(B)
    n = min(4, max(1, ceil_div(4 * l2_bytes, hydra_read)))
    while n > 1 and n * set_bytes > SET_BYTES_CAP:
        n -= 1
    return n


class Case:
    """One implementation at one shape: per-set callables plus what to check."""

    def __init__(self, name, variant, fns, check_out, nbytes):
        self.name, self.variant, self.fns, self.check_out, self.nbytes = name, variant, fns, check_out, nbytes


def sdpa_call(backend, q, k, v, variant):
    from torch.nn.attention import sdpa_kernel

    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    if variant == "gqa":
        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    else:
        q_fold = q.view(B, Hkv, Hq // Hkv, D)

        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q_fold, k, v)
    return fn


def flashinfer_paged_view(t: torch.Tensor, page: int) -> torch.Tensor:
    """(B, Hkv, T, D) contiguous -> (N, Hkv, page, D) HND pages, no copy.

    Page n = b * (Hkv*T/page) + j holds tokens [j*page, (j+1)*page) of sequence
    b for every head: page stride page*D, head stride T*D, token stride D.
    """
    B, Hkv, T, D = t.shape
    n_pp = T // page
    n = (B - 1) * Hkv * n_pp + n_pp
    return t.as_strided((n, Hkv, page, D), (page * D, T * D, D, 1), t.storage_offset())


def flashinfer_page_table(B: int, T: int, page: int, device):
    n_pp = T // page
    indptr = (torch.arange(B + 1, dtype=torch.int32) * n_pp).to(device)
    indices = (torch.arange(B, dtype=torch.int64)[:, None] * (HKV * n_pp)
               + torch.arange(n_pp, dtype=torch.int64)[None, :]).flatten().to(torch.int32).to(device)
    last_page_len = torch.full((B,), page, dtype=torch.int32, device=device)
    return indptr, indices, last_page_len


def run_case(case: Case, B: int, T: int, args, copy_gbps: float):
    """Check, then time, one case in eager and graph modes; returns {mode: row}."""
    base = {"name": case.name, "B": B, "T": T, "D": HEAD_DIM}
    results = {}
    modes = ["eager"] if args.no_graph else ["eager", "graph"]
    for mode in modes:
        row = dict(base, mode=mode, us=None)
        try:
            if mode == "eager":
                out0 = case.fns[0]()
                torch.cuda.synchronize()
                check = case.check_out(out0)
                del out0
                timed = rotating(case.fns)
            else:
                graphs = []
                for fn in case.fns:
                    graphs.append(capture_graph(fn))
                graphs[0][0].replay()
                torch.cuda.synchronize()
                check = case.check_out(graphs[0][1])
                timed = rotating([g.replay for g, _ in graphs])
            row["us"] = do_bench_us(timed, args.rep)
            # Five back-to-back trials, median: one trial swings with the VM's host (NOTES v5, v12).
            trials = [back_to_back_us(timed) for _ in range(5)]
            row["us_back_to_back"] = statistics.median(t[0] for t in trials)
            row["host_us_per_call"] = statistics.median(t[1] for t in trials)
            row["us_back_to_back_trials"] = [round(t[0], 2) for t in trials]
            row.update(check)
            row["bytes"] = case.nbytes
            row["gbps"] = gbps(case.nbytes, row["us"])
            row["floor_us"] = floor_us(case.nbytes, copy_gbps)
            if case.variant:
                row["variant"] = case.variant
        except Exception as e:  # a refused shape or a broken kernel becomes a skipped row
            row["us"] = None
            row["skipped"] = short_reason(e)
            if args.verbose:
                traceback.print_exc()
        finally:
            if mode == "graph":
                graphs = None
            torch.cuda.synchronize()
        results[mode] = row
        err = row.get("max_rel_err")
        if row["us"] is None:
            log(f"  {case.name:16s} {case.variant or '':5s} {mode:5s} skipped: {row['skipped']}")
        else:
            log(f"  {case.name:16s} {case.variant or '':5s} {mode:5s} {row['us']:10.1f} us "
                f"{row['gbps']:8.0f} GB/s  floor {row['floor_us']:8.1f} us  "
                f"err {err if err is None else f'{err:.2e}'}{'' if row.get('correct', True) else '  WRONG'}")
    return results


def bench_cache_step(B, T, ctx, s0, sub, refs, args, copy_gbps, modes, shape_rows):
    """hydra_cache_step rows: HydraKVCache.step (append one token + attend, the append
    fused into the selection launches), against the cached-summary attend alone on the
    same cache (HydraKVCache.attend, same buffers and max_seq_len; the hydra_cached row
    of the shape, over tensors exactly T long, is reported beside it). The append's cost
    is the step's time minus that attend's; the separate append launch is timed too.

    Equal lengths: every timed step first restores the lengths to T - 1 (so it appends
    token T - 1 again and attends over T tokens), and every timed attend first sets them
    to T: both graphs carry the same 4-byte-per-sequence copy. Without it the step's
    lengths would grow by one per call over the thousands of timed calls while the
    attend's stay at T, and the comparison would charge the step for a longer context.

    The cache is prefilled with the first T-1 tokens of input set 0 and the step
    appends token T-1, so the first step's output is checked against the same fp32
    reference as hydra_cached. While timing, every call appends one more token (the
    lengths grow from T by up to a few thousand tokens, which only makes the step
    dearer); the cache has CACHE_HEADROOM tokens of room past T.
    """
    hydra, ref = ctx["hydra"], ctx["ref"]
    q0, k0, v0 = refs
    cache = hydra.HydraKVCache(B, HKV, HEAD_DIM, T + CACHE_HEADROOM, dtype=DTYPE, device=DEVICE,
                               precision=PRECISION)
    k_prompt, v_prompt = s0["k"][:, :, :T - 1], s0["v"][:, :, :T - 1]
    k_new, v_new, q = s0["k"][:, :, T - 1:T], s0["v"][:, :, T - 1:T], s0["q"]
    hydra_ref = ref.hydra(q0, k0, v0, precision=PRECISION).float()

    def reset():
        cache.prefill(k_prompt, v_prompt)
        torch.cuda.synchronize()

    reset()
    lens_before = cache.seqlens.clone()      # T - 1
    lens_after = lens_before + 1             # T

    def step():
        cache.seqlens.copy_(lens_before)
        return cache.step(q, k_new, v_new)

    def append_only():
        cache.append(k_new, v_new)

    def attend_only():
        cache.seqlens.copy_(lens_after)
        return cache.attend(q)

    rows = []
    for mode in modes:
        reset()
        if mode == "eager":
            out = step()
            torch.cuda.synchronize()
            timed = step
        else:
            graph, out = capture_graph(step)  # its warm-up calls append: reset, then replay once
            reset()
            graph.replay()
            torch.cuda.synchronize()
            timed = graph.replay
        err = max_rel_err(sub(out), hydra_ref)
        us = do_bench_us(timed, args.rep)
        reset()
        if mode == "eager":
            append_us = do_bench_us(append_only, min(args.rep, 50))
        else:
            graph_a, _ = capture_graph(append_only)
            reset()
            append_us = do_bench_us(graph_a.replay, min(args.rep, 50))
        reset()
        if mode == "eager":
            attend_cache_us = do_bench_us(attend_only, args.rep)
        else:
            graph_t, _ = capture_graph(attend_only)
            attend_cache_us = do_bench_us(graph_t.replay, args.rep)
        cache.check_overflow()
        cached_row = next((r for r in shape_rows if r["name"] == "hydra_cached" and r["mode"] == mode
                           and r.get("us") is not None), None)
        attend = {"us": attend_cache_us}
        nbytes = step_bytes("hydra_cached", B, T) + 4 * B * HKV * HEAD_DIM * 2  # + the appended rows
        row = {"name": "hydra_cache_step", "B": B, "T": T, "D": HEAD_DIM, "mode": mode, "us": us,
               "append_launch_us": append_us, "max_rel_err": err, "checked_batch_indices": sorted({0, B - 1}),
               "correct": err is not None and err < MAX_REL_ERR, "bytes": nbytes, "gbps": gbps(nbytes, us),
               "floor_us": floor_us(nbytes, copy_gbps), "cache_headroom_tokens": CACHE_HEADROOM,
               "method": "step and attend each restore the lengths first (T - 1 before the step's append, "
                         "T for the attend): equal lengths, the same copy in both"}
        if attend is not None:
            append_cost = us - attend["us"]  # what appending adds to the step
            row.update({"attend_us": attend["us"], "step_over_attend": us / attend["us"],
                        "hydra_cached_us": cached_row["us"] if cached_row else None,
                        "step_over_hydra_cached": us / cached_row["us"] if cached_row else None,
                        "append_us": append_cost,
                        "append_share_of_attend": append_cost / attend["us"],
                        "append_launch_share_of_attend": append_us / attend["us"],
                        "target_step_over_attend": TARGET_STEP_OVER_ATTEND,
                        "meets_step_target": us <= TARGET_STEP_OVER_ATTEND * attend["us"] and row["correct"],
                        "target_append_share": TARGET_APPEND_SHARE,
                        "meets_append_target": append_cost < TARGET_APPEND_SHARE * attend["us"]})
        log(f"  hydra_cache_step {mode:5s} {us:9.1f} us (separate append launch {append_us:.1f} us), "
            f"rel err {err:.1e}")
        rows.append(row)
    return rows


def bench_shape(B, T, ctx, args, rows, copy_gbps):
    hydra, ref = ctx["hydra"], ctx["ref"]
    dev = DEVICE
    modes = ["eager"] if args.no_graph else ["eager", "graph"]
    n_sets = choose_n_sets(B, T, ctx["l2_bytes"], args.sets)
    need = n_sets * (2 * kv_bytes(B, T) + summary_bytes(B, T) * 1.5) * 1.1 + 4 * kv_bytes(1, T) * 2 * 2
    free, _ = torch.cuda.mem_get_info()
    log(f"\n== B={B} T={T}: {n_sets} input set(s) of {2 * kv_bytes(B, T) / 1e9:.2f} GB K+V; "
        f"hydra_cached reads {step_bytes('hydra_cached', B, T) / 1e6:.1f} MB a step")
    if need > free:
        reason = f"needs about {need / 1e9:.1f} GB of GPU memory, {free / 1e9:.1f} GB free"
        log(f"  skipped: {reason}")
        for name in HYDRA_NAMES + PEER_NAMES:
            for mode in modes:
                rows.append({"name": name, "B": B, "T": T, "D": HEAD_DIM, "mode": mode, "us": None,
                             "skipped": reason})
        return

    torch.manual_seed(B * 1_000_003 + T)
    sets = []
    for _ in range(n_sets):
        q = torch.randn(B, HQ, 1, HEAD_DIM, device=dev, dtype=DTYPE)
        k = torch.randn(B, HKV, T, HEAD_DIM, device=dev, dtype=DTYPE)
        v = torch.randn(B, HKV, T, HEAD_DIM, device=dev, dtype=DTYPE)
        sets.append({"q": q, "k": k, "v": v})
    summaries_error = None
    try:
        for s in sets:
            s["S"] = hydra.page_summaries(s["k"], page_size=PAGE_SIZE)
            s["S_e4m3"] = hydra.page_summaries(s["k"], page_size=PAGE_SIZE, dtype=E4M3)
        torch.cuda.synchronize()
    except Exception as e:
        summaries_error = short_reason(e)
        log(f"  hydra.page_summaries failed: {summaries_error}")

    # The checked sub-batch: the first and the last sequence of set 0.
    check_idx = sorted({0, B - 1})
    idx_t = torch.tensor(check_idx, device=dev)
    s0 = sets[0]

    def sub(t):
        return t if len(check_idx) == B else t.index_select(0, idx_t)

    # References take the same arguments upcast to fp32, so their outputs are fp32 too.
    q0, k0, v0 = sub(s0["q"]).float(), sub(s0["k"]).float(), sub(s0["v"]).float()
    dense_ref = dense_reference(q0, k0, v0)
    torch.cuda.synchronize()

    shape_rows = []

    # -- hydra ---------------------------------------------------------------
    summary_elem = s0["S"].element_size() if "S" in s0 else 2
    for name in HYDRA_NAMES:
        cached = name != "hydra_stateless"
        skey = "S_e4m3" if name == "hydra_cached_e4m3" else "S"
        if cached and summaries_error:
            for mode in modes:
                shape_rows.append({"name": name, "B": B, "T": T, "D": HEAD_DIM, "mode": mode, "us": None,
                                   "skipped": f"hydra.page_summaries failed: {summaries_error}"})
            continue
        S0 = sub(s0[skey]) if cached else None
        hydra_ref = sparse_ref = ref_error = None
        try:  # the end-to-end reference: same arguments, computed in fp32
            hydra_ref = ref.hydra(q0, k0, v0, precision=PRECISION, page_summaries=S0).float()
        except Exception as e:
            ref_error = f"hydra.reference.hydra failed: {short_reason(e)}"
            log(f"  {name}: {ref_error}")
        try:  # the kernel's selection, and its attention over exactly those pages
            pages_k = sub(hydra.select_pages(s0["q"], s0["k"], precision=PRECISION,
                                             page_summaries=s0[skey] if cached else None))
            pages_r = ref.select_pages(q0, k0, precision=PRECISION, page_summaries=S0)
            S_for_scores = S0 if cached else ref.page_summaries(k0, page_size=PAGE_SIZE)
            scores = ref.page_scores(q0, S_for_scores, page_size=PAGE_SIZE)
            sel = check_selection(pages_k, pages_r, scores, T)
            sparse_ref = ref.sparse_attention(q0, k0, v0, pages_k, page_size=PAGE_SIZE).float()
            del pages_r, S_for_scores, scores
        except Exception as e:
            sel = {"selection_ok": None,
                   "selection_problems": [f"select_pages check failed: {short_reason(e)}"]}
        torch.cuda.synchronize()

        def check_out(out, hydra_ref=hydra_ref, sparse_ref=sparse_ref, sel=sel, ref_error=ref_error):
            o = sub(out)
            err = max_rel_err(o, hydra_ref) if hydra_ref is not None else None
            res = {"max_rel_err": err, "checked_batch_indices": check_idx}
            if ref_error:
                res["check_error"] = ref_error
            if sparse_ref is not None:
                res["attn_rel_err"] = max_rel_err(o, sparse_ref)
            res.update(sel)
            res["correct"] = err is not None and err < MAX_REL_ERR and sel.get("selection_ok") is not False
            return res

        def make(s, cached=cached, skey=skey):
            S = s[skey] if cached else None
            return lambda: hydra.hydra(s["q"], s["k"], s["v"], precision=PRECISION, page_summaries=S)

        case = Case(name, None, [make(s) for s in sets], check_out, step_bytes(name, B, T, summary_elem))
        for row in run_case(case, B, T, args, copy_gbps).values():
            row["n_sets"] = n_sets
            shape_rows.append(row)
        del case, hydra_ref, sparse_ref
        torch.cuda.empty_cache()

    # -- coarse-to-fine (issue 6): flat 8-token pages vs superpages over them ------
    if (B, T) in HIER_SHAPES and not args.no_hier:
        flat_pol, hier_pol = hier_policies(hydra)
        try:
            for st in sets:
                st["S8"] = hydra.page_summaries(st["k"], page_size=HIER_PAGE)
                st["SS"] = hydra.superpage_summaries(st["S8"], HIER_SUPERPAGE)
                st["S8_e4m3"] = hydra.page_summaries(st["k"], page_size=HIER_PAGE, dtype=E4M3)
                st["SS_e4m3"] = hydra.superpage_summaries(st["S8_e4m3"], HIER_SUPERPAGE)
            for name, pol in (("hydra_flat8", flat_pol), ("hydra_hier", hier_pol),
                              ("hydra_flat8_e4m3", flat_pol), ("hydra_hier_e4m3", hier_pol)):
                sfx = "_e4m3" if name.endswith("_e4m3") else ""
                coarse = name.startswith("hydra_hier")
                S8, SS = sub(s0["S8" + sfx]), sub(s0["SS" + sfx]) if coarse else None
                want = ref.hydra(q0, k0, v0, policy=pol, page_summaries=S8, superpage_summaries=SS).float()
                pages_k = sub(hydra.select_pages(s0["q"], s0["k"], policy=pol, page_summaries=s0["S8" + sfx],
                                                 superpage_summaries=s0["SS" + sfx] if SS is not None else None))
                pages_r = ref.select_pages(q0, k0, policy=pol, page_summaries=S8, superpage_summaries=SS)
                same_pages = bool(torch.equal(pages_k.cpu(), pages_r.cpu()))

                def check_out(out, want=want, same_pages=same_pages):
                    err = max_rel_err(sub(out), want)
                    return {"max_rel_err": err, "checked_batch_indices": check_idx, "selection_ok": same_pages,
                            "correct": err is not None and err < MAX_REL_ERR and same_pages}

                def make(st, pol=pol, coarse=coarse, sfx=sfx):
                    SSs = st["SS" + sfx] if coarse else None
                    return lambda: hydra.hydra(st["q"], st["k"], st["v"], policy=pol, page_summaries=st["S8" + sfx],
                                               superpage_summaries=SSs)

                case = Case(name, None, [make(st) for st in sets], check_out, hier_step_bytes(name, B, T))
                for row in run_case(case, B, T, args, copy_gbps).values():
                    row.update({"n_sets": n_sets, "page_size": HIER_PAGE})
                    if coarse:
                        row.update({"superpage": HIER_SUPERPAGE, "shortlist": HIER_SHORTLIST})
                    if sfx:
                        row["summary_dtype"] = "fp8_e4m3"
                    shape_rows.append(row)
                del case, want, pages_k, pages_r
            torch.cuda.empty_cache()
        except Exception as e:
            log(f"  coarse-to-fine rows failed: {short_reason(e)}")
            if args.verbose:
                traceback.print_exc()
            for name in ("hydra_flat8", "hydra_hier", "hydra_flat8_e4m3", "hydra_hier_e4m3"):
                for mode in modes:
                    shape_rows.append({"name": name, "B": B, "T": T, "D": HEAD_DIM, "mode": mode, "us": None,
                                       "skipped": f"failed: {short_reason(e)}"})
        for st in sets:
            for key in ("S8", "SS", "S8_e4m3", "SS_e4m3"):
                st.pop(key, None)
        torch.cuda.empty_cache()

    # -- HydraKVCache: append + attend, the whole cached decode step -------------
    if T >= CACHE_STEP_MIN_T and B <= CACHE_STEP_MAX_B and not summaries_error:
        try:
            shape_rows.extend(bench_cache_step(B, T, ctx, s0, sub, (q0, k0, v0), args, copy_gbps, modes,
                                               shape_rows))
        except Exception as e:
            log(f"  hydra_cache_step failed: {short_reason(e)}")
            if args.verbose:
                traceback.print_exc()
            for mode in modes:
                shape_rows.append({"name": "hydra_cache_step", "B": B, "T": T, "D": HEAD_DIM, "mode": mode,
                                   "us": None, "skipped": f"failed: {short_reason(e)}"})
        torch.cuda.empty_cache()

    def check_dense(out):
        o = out.reshape(out.shape[0], HQ, 1, HEAD_DIM)
        err = max_rel_err(sub(o), dense_ref)
        return {"max_rel_err": err, "checked_batch_indices": check_idx,
                "correct": err is not None and err < MAX_REL_ERR}

    # -- dense peers: each tried in its variants, the row keeps the fastest correct one --
    def peer_rows(name, variants):
        """variants: [(variant, make_fns)]; make_fns() -> per-set callables (may raise)."""
        per_variant, refused = {}, {}
        for variant, make_fns in variants:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    fns = make_fns()
                    fns[0]()  # a refused shape raises here, before any timing
                    torch.cuda.synchronize()
            except Exception as e:
                why = " ".join(str(w.message).replace("\n", " ") for w in caught)[:300]
                refused[variant] = short_reason(e, 200) + (f" [{why}]" if why else "")
                log(f"  {name:16s} {variant:5s} refused: {refused[variant]}")
                if args.verbose:
                    traceback.print_exc()
                continue
            case = Case(name, variant, fns, check_dense, step_bytes(name, B, T))
            per_variant[variant] = run_case(case, B, T, args, copy_gbps)
            del case, fns
        for mode in modes:
            candidates = [r[mode] for r in per_variant.values()
                          if r[mode].get("us") is not None and r[mode].get("correct")]
            if candidates:
                best = dict(min(candidates, key=lambda r: r["us"]))
            else:
                reasons = [f"{v}: {r[mode].get('skipped') or 'wrong output'}" for v, r in per_variant.items()]
                reasons += [f"{v}: {why}" for v, why in refused.items()]
                best = {"name": name, "B": B, "T": T, "D": HEAD_DIM, "mode": mode, "us": None,
                        "skipped": "; ".join(reasons) or "no variant ran"}
            best["variants_us"] = {v: r[mode].get("us") for v, r in per_variant.items()}
            if refused:
                best["variants_refused"] = refused
            shape_rows.append(best)
        torch.cuda.empty_cache()

    def skip_rows(name, reason):
        for mode in modes:
            shape_rows.append({"name": name, "B": B, "T": T, "D": HEAD_DIM, "mode": mode, "us": None,
                               "skipped": reason})

    from torch.nn.attention import SDPBackend

    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        peer_rows(name, [(variant, lambda variant=variant: [sdpa_call(backend, s["q"], s["k"], s["v"], variant)
                                                            for s in sets])
                         for variant in ("gqa", "fold")])

    fi = ctx["flashinfer"]
    if args.no_flashinfer:
        skip_rows("flashinfer", "disabled by --no-flashinfer")
    elif fi is None:
        skip_rows("flashinfer", ctx["flashinfer_version"])
    elif T % FLASHINFER_PAGE:
        skip_rows("flashinfer", f"T={T} is not a multiple of the page size {FLASHINFER_PAGE}")
    else:
        def flashinfer_fns(use_tensor_cores):
            key = f"fi_wrapper_tc{int(use_tensor_cores)}"
            if ctx.get(key) is None:
                if ctx.get("fi_workspace") is None:
                    ctx["fi_workspace"] = torch.zeros(FLASHINFER_WORKSPACE, dtype=torch.uint8, device=dev)
                kind = "tensor-core" if use_tensor_cores else "CUDA-core"
                log(f"  flashinfer: planning; the first plan JIT-compiles the {kind} decode kernel ...")
                ctx[key] = fi.BatchDecodeWithPagedKVCacheWrapper(ctx["fi_workspace"], kv_layout="HND",
                                                                 use_tensor_cores=use_tensor_cores)
            wrapper = ctx[key]
            indptr, indices, last_len = flashinfer_page_table(B, T, FLASHINFER_PAGE, dev)
            wrapper.plan(indptr, indices, last_len, HQ, HKV, HEAD_DIM, FLASHINFER_PAGE,
                         pos_encoding_mode="NONE", q_data_type=DTYPE, kv_data_type=DTYPE)

            def make(s):
                kp = flashinfer_paged_view(s["k"], FLASHINFER_PAGE)
                vp = flashinfer_paged_view(s["v"], FLASHINFER_PAGE)
                q3 = s["q"].view(B, HQ, HEAD_DIM)
                out = torch.empty(B, HQ, HEAD_DIM, device=dev, dtype=DTYPE)
                return lambda: wrapper.run(q3, (kp, vp), out=out)

            return [make(s) for s in sets]

        # The two wrappers share one workspace, so each variant is planned, timed and
        # finished before the next plans (plan rewrites the workspace).
        variants = [(f"HND-p{FLASHINFER_PAGE}", lambda: flashinfer_fns(False))]
        if args.flashinfer_tensor_cores:
            variants.append((f"HND-p{FLASHINFER_PAGE}-tc", lambda: flashinfer_fns(True)))
        peer_rows("flashinfer", variants)

    # -- speedups, floors and targets ----------------------------------------------
    for mode in modes:
        peers = [r for r in shape_rows if r["name"] in PEER_NAMES and r["mode"] == mode
                 and r.get("us") is not None and r.get("correct")]
        best = min(peers, key=lambda r: r["us"]) if peers else None
        for r in shape_rows:
            if r["name"] not in HYDRA_NAMES + ("hydra_cache_step", "hydra_flat8", "hydra_hier", "hydra_flat8_e4m3",
                                               "hydra_hier_e4m3") \
                    or r["mode"] != mode or r.get("us") is None:
                continue
            r["best_dense_us"] = best["us"] if best else None
            r["best_dense_name"] = best["name"] if best else None
            r["speedup_vs_best_dense"] = best["us"] / r["us"] if best else None
            r["floor_ratio"] = r["us"] / r["floor_us"]
        for sfx in ("", "_e4m3"):  # coarse-to-fine against flat selection with the same summaries
            flat = next((r for r in shape_rows if r["name"] == "hydra_flat8" + sfx and r["mode"] == mode
                         and r.get("us") is not None), None)
            for r in shape_rows:
                if r["name"] == "hydra_hier" + sfx and r["mode"] == mode and r.get("us") is not None \
                        and flat is not None:
                    r["flat_us"] = flat["us"]
                    r["speedup_vs_flat"] = flat["us"] / r["us"]
    target_mode = "eager" if args.no_graph else "graph"
    for r in shape_rows:
        if r["mode"] != target_mode or r.get("us") is None:
            continue
        sp = r.get("speedup_vs_best_dense")
        if r["name"] == "hydra_cached" and (B, T) in TARGET_SPEEDUP:
            r["target_speedup"] = TARGET_SPEEDUP[(B, T)]
            r["meets_target"] = bool(sp is not None and sp >= r["target_speedup"] and r.get("correct"))
            if T >= FLOOR_MIN_T:
                r["target_floor_ratio"] = TARGET_FLOOR_RATIO
                r["meets_floor_target"] = bool(r["floor_ratio"] <= TARGET_FLOOR_RATIO)
        if r["name"] == "hydra_hier" and (B, T) in TARGET_HIER:
            checks = {}
            for key, target in TARGET_HIER[(B, T)].items():
                value = r.get(key)
                ok = value is not None and (value <= target if key == "floor_ratio" else value >= target)
                checks[key] = {"value": value, "target": target, "met": bool(ok and r.get("correct"))}
            r["hier_targets"] = checks
        if r["name"] == "hydra_stateless" and (B, T) in TARGET_STATELESS_SPEEDUP:
            r["target_speedup"] = TARGET_STATELESS_SPEEDUP[(B, T)]
            r["meets_target"] = bool(sp is not None and sp >= r["target_speedup"] and r.get("correct"))

    for r in shape_rows:
        r.setdefault("n_sets", n_sets)
    rows.extend(shape_rows)
    # The caller frees this shape's tensors (closures hold them until we return).


# ----------------------------------------------------------------------------
# Other head dims (issue 9): hydra_cached and the SDPA peers at B=1, T=131,072
# ----------------------------------------------------------------------------
HEAD_DIM_CASES = [(64, 9, 3), (256, 16, 2)]  # (D, Hq, Hkv): SmolLM-like and Qwen3-Next-like
HEAD_DIM_T = 131072
TARGET_HEAD_DIM_SPEEDUP = 8.0


def bench_head_dims(ctx, args, rows, copy_gbps):
    hydra, ref = ctx["hydra"], ctx["ref"]
    modes = ["eager"] if args.no_graph else ["eager", "graph"]
    T = HEAD_DIM_T
    for D, Hq, Hkv in HEAD_DIM_CASES:
        log(f"\n== B=1 T={T} D={D} Hq={Hq} Hkv={Hkv}")
        torch.manual_seed(D)
        sets = [{"q": torch.randn(1, Hq, 1, D, device=DEVICE, dtype=DTYPE),
                 "k": torch.randn(1, Hkv, T, D, device=DEVICE, dtype=DTYPE),
                 "v": torch.randn(1, Hkv, T, D, device=DEVICE, dtype=DTYPE)} for _ in range(2)]
        for st in sets:
            st["S"] = hydra.page_summaries(st["k"], page_size=PAGE_SIZE)
            st["S_e4m3"] = hydra.page_summaries(st["k"], page_size=PAGE_SIZE, dtype=E4M3)
        s0 = sets[0]
        q0, k0, v0 = s0["q"].float(), s0["k"].float(), s0["v"].float()
        want_sparse = ref.hydra(q0, k0, v0, precision=PRECISION, page_summaries=s0["S"]).float()
        want_e4m3 = ref.hydra(q0, k0, v0, precision=PRECISION, page_summaries=s0["S_e4m3"]).float()
        want_dense = dense_reference(q0, k0, v0)
        shape_rows = []
        kv = Hkv * T * D * 2
        sel = BUDGET_TOKENS * Hkv * D * 2

        def check(out, want):
            err = max_rel_err(out.reshape(1, Hq, 1, D), want)
            return {"max_rel_err": err, "correct": err is not None and err < MAX_REL_ERR}

        cases = [Case("hydra_cached", None,
                      [lambda st=st: hydra.hydra(st["q"], st["k"], st["v"], precision=PRECISION,
                                                 page_summaries=st["S"]) for st in sets],
                      lambda o: check(o, want_sparse),
                      Hkv * ceil_div(T, PAGE_SIZE) * 2 * D * 2 + 2 * sel),
                 Case("hydra_cached_e4m3", None,
                      [lambda st=st: hydra.hydra(st["q"], st["k"], st["v"], precision=PRECISION,
                                                 page_summaries=st["S_e4m3"]) for st in sets],
                      lambda o: check(o, want_e4m3),
                      Hkv * ceil_div(T, PAGE_SIZE) * 2 * D + 2 * sel)]
        from torch.nn.attention import SDPBackend

        for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            cases.append(Case(name, "gqa", [sdpa_call(backend, st["q"], st["k"], st["v"], "gqa") for st in sets],
                              lambda o: check(o, want_dense), 2 * kv))
        for case in cases:
            for row in run_case(case, 1, T, args, copy_gbps).values():
                row.update({"D": D, "Hq": Hq, "Hkv": Hkv, "head_dim_case": True})
                shape_rows.append(row)
        for mode in modes:
            peers = [r for r in shape_rows if not r["name"].startswith("hydra") and r["mode"] == mode
                     and r.get("us") is not None and r.get("correct")]
            best = min(peers, key=lambda r: r["us"]) if peers else None
            for r in shape_rows:
                if r["name"].startswith("hydra_cached") and r["mode"] == mode and r.get("us") is not None and best:
                    r.update({"best_dense_us": best["us"], "best_dense_name": best["name"],
                              "speedup_vs_best_dense": best["us"] / r["us"], "floor_ratio": r["us"] / r["floor_us"],
                              "target_speedup": TARGET_HEAD_DIM_SPEEDUP,
                              "meets_target": best["us"] / r["us"] >= TARGET_HEAD_DIM_SPEEDUP and r.get("correct")})
        rows.extend(shape_rows)
        del sets, cases, want_sparse, want_e4m3, want_dense, q0, k0, v0
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------
# Targets summary
# ----------------------------------------------------------------------------
def host_overhead(rows, no_graph: bool):
    B, T = HOST_OVERHEAD_SHAPE
    pick = {r["mode"]: r for r in rows if r["name"] == "hydra_cached" and (r["B"], r["T"]) == (B, T)
            and r.get("us") is not None}
    if no_graph or "eager" not in pick or "graph" not in pick:
        return None
    e, g = pick["eager"], pick["graph"]
    # Back to back is what a decode loop sees: eager pays its host time per call.
    overhead = e["us_back_to_back"] - g["us_back_to_back"]
    return {"B": B, "T": T,
            "eager_us_back_to_back": e["us_back_to_back"], "graph_us_back_to_back": g["us_back_to_back"],
            "overhead_us": overhead,
            "eager_minus_graph_do_bench_us": e["us"] - g["us"],
            "eager_host_us_per_call": e["host_us_per_call"],
            "target_us": TARGET_HOST_OVERHEAD_US, "meets_target": overhead < TARGET_HOST_OVERHEAD_US,
            "eager_trials_us": e.get("us_back_to_back_trials"), "graph_trials_us": g.get("us_back_to_back_trials"),
            "method": "eager minus graph, each the median of five trials of the device time per call over 200 "
                      "calls issued back to back (do_bench's eager figure hides host time behind its L2 clear)"}


def target_checks(rows, overhead, no_graph: bool):
    mode = "eager" if no_graph else "graph"
    checks = []
    for (B, T), target in TARGET_SPEEDUP.items():
        r = next((r for r in rows if r["name"] == "hydra_cached" and r["mode"] == mode
                  and (r["B"], r["T"]) == (B, T)), None)
        if r is None:
            continue
        checks.append({"check": f"hydra_cached speedup vs best dense ({mode}) B={B} T={T}",
                       "value": r.get("speedup_vs_best_dense"), "target": f">= {target}",
                       "met": bool(r.get("meets_target"))})
        if T >= FLOOR_MIN_T:
            checks.append({"check": f"hydra_cached us / floor_us ({mode}) B={B} T={T}",
                           "value": r.get("floor_ratio"), "target": f"<= {TARGET_FLOOR_RATIO}",
                           "met": bool(r.get("meets_floor_target"))})
    for (B, T), target in TARGET_STATELESS_SPEEDUP.items():
        r = next((r for r in rows if r["name"] == "hydra_stateless" and r["mode"] == mode
                  and (r["B"], r["T"]) == (B, T)), None)
        if r is not None:
            checks.append({"check": f"hydra_stateless speedup vs best dense ({mode}) B={B} T={T}",
                           "value": r.get("speedup_vs_best_dense"), "target": f">= {target}",
                           "met": bool(r.get("meets_target"))})
    if overhead is not None:
        checks.append({"check": "hydra_cached eager host overhead (eager - graph) B=1 T=8192, us",
                       "value": overhead["overhead_us"], "target": f"< {TARGET_HOST_OVERHEAD_US}",
                       "met": bool(overhead["meets_target"])})
    wrong = [f"{r['name']} B={r['B']} T={r['T']} {r['mode']}" for r in rows
             if r.get("us") is not None and r.get("correct") is False]
    checks.append({"check": "every timed case matches the fp32 reference (rel err < 2e-2)",
                   "value": len(wrong), "target": "0 wrong", "met": not wrong, "wrong": wrong})
    return checks


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------
def main(argv=None) -> int:
    global HIER_SUPERPAGE, HIER_SHORTLIST  # --hier-*: read by hier_policies, hier_step_bytes, bench_shape
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help="comma-separated BxT list, e.g. 1x8192,1x131072 (default: the SPEC 7 matrix)")
    p.add_argument("--quick", action="store_true",
                   help=f"short timing (rep 50 ms) and, unless --shapes is given, only {QUICK_SHAPES}")
    p.add_argument("--out", default=str(REPO / "evidence" / "decode_bench.json"),
                   help="evidence JSON to write (default: evidence/decode_bench.json)")
    p.add_argument("--no-graph", action="store_true", help="eager mode only (no CUDA-graph replay)")
    p.add_argument("--no-flashinfer", action="store_true", help="skip the FlashInfer peer")
    p.add_argument("--flashinfer-tensor-cores", action="store_true",
                   help="also time FlashInfer's tensor-core decode (use_tensor_cores=True; a longer JIT build)")
    p.add_argument("--rep", type=int, default=None, help="do_bench repetition time in ms (default 200, quick 50)")
    p.add_argument("--sets", type=int, default=None, help="number of rotating input sets (default: by size)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of skipped cases")
    p.add_argument("--no-head-dims", action="store_true", help="skip the D=64 / D=256 rows at B=1, T=131,072")
    p.add_argument("--no-hier", action="store_true", help="skip the coarse-to-fine rows (hydra_flat8, hydra_hier)")
    p.add_argument("--hier-superpage", type=int, default=HIER_SUPERPAGE,
                   help=f"pages per superpage of the hydra_hier rows (default {HIER_SUPERPAGE}; NOTES v38: 4 keeps "
                        "flat selection's fidelity on real encoder keys)")
    p.add_argument("--hier-shortlist", type=int, default=HIER_SHORTLIST,
                   help=f"shortlist of the hydra_hier rows, as a multiple of the page budget (default {HIER_SHORTLIST})")
    args = p.parse_args(argv)
    HIER_SUPERPAGE, HIER_SHORTLIST = args.hier_superpage, args.hier_shortlist

    if not torch.cuda.is_available():
        log("benchmark_hydra_decode: no CUDA device; nothing to time")
        return 2
    full = SPEC_SHAPES + ([] if args.no_hier else [x for x in HIER_SHAPES if x not in SPEC_SHAPES])
    shapes = parse_shapes(args.shapes) if args.shapes else (QUICK_SHAPES if args.quick else full)
    if args.rep is None:
        args.rep = 50 if args.quick else 200

    torch.set_grad_enabled(False)
    hydra, ref, hydra_source = load_hydra()
    write_evidence = load_write_evidence()
    flashinfer, fi_version = load_flashinfer()
    props = torch.cuda.get_device_properties(0)
    l2_bytes = int(getattr(props, "L2_cache_size", 0) or 50 * 1024 * 1024)
    log(f"device {props.name}, {props.multi_processor_count} SMs, L2 {l2_bytes / 1e6:.0f} MB; "
        f"torch {torch.__version__}; hydra from {hydra_source}")
    log(f"flashinfer: {fi_version if flashinfer is not None else 'skipped: ' + fi_version}")

    copy = measure_copy_gbps(args.rep)
    torch.cuda.empty_cache()  # the copy buffers are gone once measure_copy_gbps returns
    log(f"copy bandwidth: {copy['copy_gbps']:.0f} GB/s (1 GiB device-to-device, read + write)")

    ctx = {"hydra": hydra, "ref": ref, "flashinfer": flashinfer, "flashinfer_version": fi_version,
           "l2_bytes": l2_bytes}
    rows: list = []
    for B, T in shapes:
        bench_shape(B, T, ctx, args, rows, copy["copy_gbps"])
        gc.collect()  # the shape's closures are gone now: give its memory back
        torch.cuda.empty_cache()

    if not args.no_head_dims and not args.shapes and not args.quick:
        bench_head_dims(ctx, args, rows, copy["copy_gbps"])
    overhead = host_overhead(rows, args.no_graph)
    checks = target_checks(rows, overhead, args.no_graph)
    hier_checks = [{"check": f"hydra_hier {key} ({r['mode']}) B={r['B']} T={r['T']}", **c}
                   for r in rows if r.get("hier_targets") for key, c in r["hier_targets"].items()]
    tm = "eager" if args.no_graph else "graph"
    head_dim_checks = [{"check": f"hydra_cached speedup vs best dense ({tm}) B=1 T={r['T']} D={r['D']} "
                                 f"Hq={r['Hq']} Hkv={r['Hkv']}",
                        "value": r.get("speedup_vs_best_dense"), "target": f">= {TARGET_HEAD_DIM_SPEEDUP}",
                        "met": bool(r.get("meets_target"))}
                       for r in rows if r.get("head_dim_case") and r["name"] == "hydra_cached" and r["mode"] == tm]
    partial = not set(SPEC_SHAPES) <= set(shapes)
    extra = {
        "copy_gbps": copy["copy_gbps"],
        "copy": copy,
        "l2_bytes": l2_bytes,
        "sm_count": props.multi_processor_count,
        "hydra_source": hydra_source,
        "peers": {"sdpa_flash": "F.scaled_dot_product_attention in sdpa_kernel(FLASH_ATTENTION); "
                                "variants gqa (enable_gqa=True) and fold (q as (B, Hkv, G, D))",
                  "sdpa_cudnn": "F.scaled_dot_product_attention in sdpa_kernel(CUDNN_ATTENTION); same variants",
                  "flashinfer": (f"flashinfer {fi_version}: BatchDecodeWithPagedKVCacheWrapper(kv_layout='HND'), "
                                 f"pages of {FLASHINFER_PAGE} as a strided view of the (B, Hkv, T, D) cache")
                  if flashinfer is not None else f"skipped: {fi_version}"},
        "settings": {"Hq": HQ, "Hkv": HKV, "D": HEAD_DIM, "dtype": "bfloat16", "precision": PRECISION,
                     "page_size": PAGE_SIZE, "budget_tokens": BUDGET_TOKENS, "sink_tokens": SINK_TOKENS,
                     "recent_tokens": RECENT_TOKENS, "timer": "triton.testing.do_bench median",
                     "warmup_ms": 25, "rep_ms": args.rep, "graph": not args.no_graph,
                     "target_mode": "eager" if args.no_graph else "graph",
                     "shapes": [f"{b}x{t}" for b, t in shapes], "inputs": "torch.randn, rotated over n_sets sets"},
        "targets": {"speedup_hydra_cached": {f"{b}x{t}": s for (b, t), s in TARGET_SPEEDUP.items()},
                    "speedup_hydra_stateless": {f"{b}x{t}": s for (b, t), s in TARGET_STATELESS_SPEEDUP.items()},
                    "floor_ratio_max": TARGET_FLOOR_RATIO, "floor_min_T": FLOOR_MIN_T,
                    "eager_host_overhead_us_max": TARGET_HOST_OVERHEAD_US, "max_rel_err": MAX_REL_ERR},
        "coarse_to_fine": {"page_size": HIER_PAGE, "superpage": HIER_SUPERPAGE, "shortlist": HIER_SHORTLIST,
                           "shapes": [f"{b}x{t}" for b, t in HIER_SHAPES],
                           "targets": {f"{b}x{t}": t_ for (b, t), t_ in TARGET_HIER.items()},
                           "checks": hier_checks},
        "head_dims": {"cases": [{"D": d, "Hq": hq, "Hkv": hkv} for d, hq, hkv in HEAD_DIM_CASES], "T": HEAD_DIM_T,
                      "checks": head_dim_checks},
        "eager_host_overhead": overhead,
        "target_checks": checks,
        "all_targets_met": (not partial) and all(c["met"] for c in checks),
        "partial": partial,
    }

    log("\n" + decode_detail_table(rows))
    log("\ntargets:")
    for c in checks:
        value = c["value"]
        value = "n/a" if value is None else (f"{value:.3g}" if isinstance(value, float) else str(value))
        log(f"  [{'met' if c['met'] else 'MISSED'}] {c['check']}: {value} (target {c['target']})")
    if partial:
        log("  (a partial matrix: all_targets_met needs the six SPEC 7 shapes)")
    for c in hier_checks + head_dim_checks:
        value = "n/a" if c["value"] is None else f"{c['value']:.3g}"
        log(f"  [{'met' if c['met'] else 'MISSED'}] {c['check']}: {value} (target {c['target']})")

    if args.out:
        command = "python3 " + " ".join(sys.argv)
        write_evidence(args.out, kind="decode_bench", command=command, rows=rows, extra=extra)
        log(f"\nwrote {args.out}")

    log("\n" + decode_summary_table(rows, target_mode=extra["settings"]["target_mode"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
