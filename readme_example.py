"""hydra's main job: one long-context decode step through a bounded resident set.

    python3 readme_example.py

Uses the source checkout (torch-ext/) by default, building the CUDA extension on
first use; HYDRA_USE_HUB=1 loads the published kernel with
``kernels.get_kernel("Frosty40/hydra", version=1)`` instead. Without a CUDA GPU
it says so and runs the same call through ``hydra.reference`` (pure PyTorch).
"""

import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def load_hydra():
    if os.environ.get("HYDRA_USE_HUB") == "1":
        from kernels import get_kernel

        return get_kernel("Frosty40/hydra", version=1)
    sys.path.insert(0, os.path.join(ROOT, "torch-ext"))
    import hydra

    return hydra


def main():
    hydra = load_hydra()
    cuda = torch.cuda.is_available() and hydra.ops is not None
    device = "cuda" if cuda else "cpu"
    # A Llama-3-8B-shaped layer: 32 query heads over 8 KV heads, head dim 128.
    B, Hq, Hkv, D = 2, 32, 8, 128
    T = 65536 if cuda else 8192
    g = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(B, Hkv, T, D, device=device, generator=g).to(torch.bfloat16)
    v = torch.randn(B, Hkv, T, D, device=device, generator=g).to(torch.bfloat16)
    q = torch.randn(B, Hq, 1, D, device=device, generator=g).to(torch.bfloat16)
    lens = torch.tensor([T, T - 1000], dtype=torch.int32, device=device)  # ragged batch
    # Real attention is peaked: plant 64 keys per KV head that align with the group's
    # query, scattered through the context, the way a retrieved fact stands out.
    group = q.view(B, Hkv, Hq // Hkv, D).float().mean(2)  # (B, Hkv, D)
    for b in range(B):
        pos = torch.randperm(int(lens[b]) - 600, generator=torch.Generator().manual_seed(b))[:64].to(device)
        k[b, :, pos] = (group[b, :, None, :] * 4.0).to(k.dtype)

    if not cuda:
        print("No CUDA GPU here (or the extension did not build): running the same call through "
              "hydra.reference, the pure-PyTorch specification of the kernels.")
        impl = hydra.reference
    else:
        impl = hydra
        print(f"GPU: {torch.cuda.get_device_name()}")

    summaries = impl.page_summaries(k, cache_seqlens=lens)  # computed once, reused every step
    t0 = time.perf_counter()
    out, lse = impl.hydra(q, k, v, cache_seqlens=lens, page_summaries=summaries, return_lse=True)
    if cuda:
        torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) * 1e3

    pages = impl.select_pages(q, k, cache_seqlens=lens, page_summaries=summaries)
    attended = int((pages >= 0).sum(-1).max()) * 16
    # Compare with exact attention over the whole cache.
    dense = hydra.reference.hydra(q, k, v, cache_seqlens=lens, precision="exact")
    rel = ((out.float() - dense.float()).norm() / dense.float().norm()).item()
    print(f"q {tuple(q.shape)}, k/v {tuple(k.shape)} bf16, lengths {lens.tolist()}")
    print(f"attended at most {attended} of {T} tokens per KV head ({attended / T:.1%}); "
          f"first call {step_ms:.1f} ms (includes warm-up)")
    print(f"out {tuple(out.shape)} {out.dtype}, lse {tuple(lse.shape)}; "
          f"relative difference from exact attention over all {T} tokens: {rel:.4f}")
    assert torch.isfinite(out.float()).all() and math.isfinite(rel)


if __name__ == "__main__":
    main()
