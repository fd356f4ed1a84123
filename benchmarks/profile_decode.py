"""Where a hydra decode step's time goes (for benchmarks/NOTES.md).

    python3 benchmarks/profile_decode.py [B T ...]

All times are CUDA-graph replay medians from ``triton.testing.do_bench``, in
microseconds, Hq=32, Hkv=8, D=128, bf16, precision "high":
- a graph of one trivial kernel: the replay cost every graph number carries;
- scoring + selection (select_pages), attention over a fixed page list
  (sparse_attention), the whole step (hydra), the stateless step, page_summaries;
- the attention over the first 16, 32, ..., 256 pages of each head's list: the
  slope is the cost of the bytes, the intercept the fixed cost (launch, page list,
  pipeline fill, split merge);
then kernel times of ten eager steps from torch.profiler.

    python3 benchmarks/profile_decode.py --hier [B T ...]

instead breaks down the coarse-to-fine step (the decode benchmark's ``hydra_hier``
policy: 8-token pages, superpages of 16, a shortlist of 4x the budget), for 16-bit and
e4m3 summaries: graph replays of the one-kernel graph, the selection alone, the
attention over its pages and the whole step, then each kernel's mean time over ten eager
steps (torch.profiler, in launch order). With ``HYDRA_PDL=0`` the kernels do not overlap,
so those times are each kernel's own.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "torch-ext"))
import hydra  # noqa: E402
from timing import graph_us  # noqa: E402


def make_qkv(B, T, Hq=32, Hkv=8, D=128):
    """Random bf16 q (B, Hq, 1, D), k and v (B, Hkv, T, D), seeded by T."""
    g = torch.Generator(device="cuda").manual_seed(T)
    q = torch.randn(B, Hq, 1, D, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(torch.bfloat16)
    v = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(torch.bfloat16)
    return q, k, v


def kernel_means(fn, steps=10):
    """Each kernel's mean device time (us) over ``steps`` eager calls, in launch order."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    order, total = [], {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if ev.name not in total:
            order.append(ev.name)
            total[ev.name] = []
        total[ev.name].append(ev.device_time)
    return [(name, len(total[name]) / steps, sum(total[name]) / len(total[name])) for name in order]


def hier(shapes):
    pol = hydra.HydraPolicy(page_size=8, budget_tokens=4096, sink_tokens=64, recent_tokens=512,
                            superpage=16, shortlist=4)
    print(torch.cuda.get_device_name())
    for B, T in shapes:
        q, k, v = make_qkv(B, T)
        out = torch.empty_like(q)
        for name, dt in (("16-bit", None), ("e4m3", torch.float8_e4m3fn)):
            s8 = hydra.page_summaries(k, page_size=8, dtype=dt)
            ss = hydra.superpage_summaries(s8, 16)
            pages = hydra.select_pages(q, k, policy=pol, page_summaries=s8, superpage_summaries=ss)
            t = {
                "one-kernel graph": graph_us(lambda: out.add_(0)),
                "select(2 stages)": graph_us(lambda: hydra.select_pages(q, k, policy=pol, page_summaries=s8,
                                                                        superpage_summaries=ss)),
                "attention(pages)": graph_us(lambda: hydra.sparse_attention(q, k, v, pages, page_size=8, out=out)),
                "step": graph_us(lambda: hydra.hydra(q, k, v, policy=pol, page_summaries=s8,
                                                     superpage_summaries=ss, out=out)),
            }
            print(f"hier {name} B={B} T={T}: " + ", ".join(f"{n} {u:.1f} us" for n, u in t.items()))
            rows = kernel_means(lambda: hydra.hydra(q, k, v, policy=pol, page_summaries=s8,
                                                    superpage_summaries=ss, out=out))
            for kname, per_step, us in rows:
                print(f"  {per_step:.0f}x {us:7.2f} us  {kname[:110]}")
            print(f"  sum of one step's kernels: {sum(n * us for _, n, us in rows):.2f} us")
        del q, k, v, s8, ss
        torch.cuda.empty_cache()


def main():
    argv = sys.argv[1:]
    if argv and argv[0] == "--hier":
        args = [int(a) for a in argv[1:]] or [1, 131072]
        hier(list(zip(args[::2], args[1::2])))
        return
    args = [int(a) for a in argv] or [1, 131072]
    shapes = list(zip(args[::2], args[1::2]))
    print(torch.cuda.get_device_name())
    for B, T in shapes:
        q, k, v = make_qkv(B, T)
        summ = hydra.page_summaries(k)
        pages = hydra.select_pages(q, k, page_summaries=summ)
        out = torch.empty_like(q)
        t = {
            "one-kernel graph": graph_us(lambda: out.add_(0)),
            "select(score+topk)": graph_us(lambda: hydra.select_pages(q, k, page_summaries=summ)),
            "select stateless": graph_us(lambda: hydra.select_pages(q, k)),
            "attention(pages)": graph_us(lambda: hydra.sparse_attention(q, k, v, pages, out=out)),
            "step cached": graph_us(lambda: hydra.hydra(q, k, v, page_summaries=summ, out=out)),
            "step stateless": graph_us(lambda: hydra.hydra(q, k, v, out=out)),
            "page_summaries": graph_us(lambda: hydra.page_summaries(k)),
        }
        print(f"B={B} T={T}: " + ", ".join(f"{n} {u:.1f} us" for n, u in t.items()))
        sweep = []
        n = 16
        while n <= pages.shape[-1]:
            pg = pages[:, :, :n].contiguous()
            sweep.append(f"{n} pages {graph_us(lambda: hydra.sparse_attention(q, k, v, pg, out=out)):.1f} us")
            n *= 2
        print(f"B={B} T={T}: attention over the first n pages of each head: " + ", ".join(sweep))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                hydra.hydra(q, k, v, page_summaries=summ, out=out)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))
        del q, k, v, summ
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
