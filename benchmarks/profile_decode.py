"""Per-kernel breakdown of one hydra decode step (for benchmarks/NOTES.md).

    python3 benchmarks/profile_decode.py [B T ...]

Times, with CUDA-graph replay and do_bench medians: scoring + selection
(select_pages), attention over a given page list (sparse_attention), the whole
step (hydra), and the stateless step; prints kernel times from torch.profiler.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "torch-ext"))
import hydra  # noqa: E402
from timing import graph_us  # noqa: E402


def main():
    args = [int(a) for a in sys.argv[1:]] or [1, 131072]
    shapes = list(zip(args[::2], args[1::2]))
    Hq, Hkv, D = 32, 8, 128
    for B, T in shapes:
        g = torch.Generator(device="cuda").manual_seed(T)
        q = torch.randn(B, Hq, 1, D, device="cuda", generator=g).to(torch.bfloat16)
        k = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(torch.bfloat16)
        v = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(torch.bfloat16)
        summ = hydra.page_summaries(k)
        pages = hydra.select_pages(q, k, page_summaries=summ)
        out = torch.empty_like(q)
        t = {
            "select(score+topk)": graph_us(lambda: hydra.select_pages(q, k, page_summaries=summ)),
            "select stateless": graph_us(lambda: hydra.select_pages(q, k)),
            "attention(pages)": graph_us(lambda: hydra.sparse_attention(q, k, v, pages, out=out)),
            "step cached": graph_us(lambda: hydra.hydra(q, k, v, page_summaries=summ, out=out)),
            "step stateless": graph_us(lambda: hydra.hydra(q, k, v, out=out)),
            "page_summaries": graph_us(lambda: hydra.page_summaries(k)),
        }
        print(f"B={B} T={T}: " + ", ".join(f"{n} {u:.1f} us" for n, u in t.items()))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                hydra.hydra(q, k, v, page_summaries=summ, out=out)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))
        del q, k, v, summ
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
