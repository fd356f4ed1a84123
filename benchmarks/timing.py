"""Shared timing helper: median CUDA-graph replay time of a callable, in microseconds."""

import torch
import triton.testing


def graph_us(fn, warmup_calls=3, rep_ms=200):
    """Capture ``fn`` in a CUDA graph (after warm-up calls on a side stream) and return
    the median replay time from ``triton.testing.do_bench``, in microseconds."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=rep_ms, return_mode="median") * 1e3
