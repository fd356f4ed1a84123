"""Shared timing helpers: CUDA-graph capture and replay time, calls issued back to back,
and input sets taken in turn."""

import time

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


def rotating(fns):
    """One callable that calls fns[0], fns[1], ... in turn (the input sets)."""
    if len(fns) == 1:
        return fns[0]
    state = [0]

    def call():
        i = state[0]
        state[0] = (i + 1) % len(fns)
        return fns[i]()

    return call


def back_to_back_us(fn, n: int = 200):
    """(device us per call, host us per call) for n calls issued back to back.

    Unlike do_bench, nothing runs between the calls, so a step whose host side
    is slower than its kernels shows it here.
    """
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3, host


def capture_graph(fn):
    """Capture fn() in a CUDA graph after warming it up on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out
