"""Decode tokens/s through transformers: hydra against SDPA, on a model with real dimensions.

    python3 benchmarks/benchmark_generate.py --out evidence/generate_bench.json

The model: a random-initialised Llama with Llama-3-8B's attention and MLP shapes
(hidden 4096, 32 query heads over 8 KV heads, head dim 128, MLP 14336, vocab 128256),
4 layers, bf16, batch 8: at 128k tokens of context the KV cache (4.3 GB per layer)
dwarfs the weights a step reads (0.44 GB per layer), so the dense step is
attention-dominated, as it is in the full 32-layer model.

Each cache is filled with T random K/V tokens per layer (a 128k-token prompt at
batch 8 would need tens of GB of activations, and prefill is not what this measures);
each timed call is one decode step as ``generate`` runs it: ``model(next_token,
past_key_values=cache, logits_to_keep=1)`` and a greedy argmax, the cache growing by
one token per call. Medians of ``triton.testing.do_bench`` (ms per step); tokens/s is
B / step time; ``kernel_ms`` is the GPU time of the step's kernels (torch.profiler), so
step_ms - kernel_ms is time the GPU waits for the host. Rows:

* ``hydra_generate``: ``attn_implementation="hydra"`` with ``HydraCache`` (precision
  "high": 4096-token budget, fused append + attend per layer), with ``dense_layers=0``
  by default: the preset's first 2 dense layers are 2 of 32 in Llama-3-8B, but would be
  half of this 4-layer stand-in (``--dense-layers 2`` measures that);
* ``sdpa_dynamic``, ``sdpa_static``: ``attn_implementation="sdpa"`` with DynamicCache
  (concatenates K/V every step) and StaticCache (preallocated; transformers then passes a
  mask, and SDPA's GQA path expands K/V);
* ``sdpa_generate``: the faster of the two, the baseline of ``speedup_vs_sdpa``.

``peak_mem_bytes`` is ``torch.cuda.max_memory_allocated`` from the cache fill through the
timed steps (model weights included).
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
from pathlib import Path

import torch
import triton.testing

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "torch-ext"))

import hydra  # noqa: E402
import hydra.integrations.transformers as ht  # noqa: E402
from hydra.evidence import write_evidence  # noqa: E402


def log(msg):
    print(msg, flush=True)


def build_model(layers, max_pos):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=max_pos,
                      rope_theta=500000.0, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model.eval(), cfg


def fill(cache_kind, cfg, B, T, extra, policy=None):
    """A cache of `cache_kind` holding T random tokens per layer."""
    from transformers import DynamicCache, StaticCache

    if cache_kind == "hydra":
        cache = ht.HydraCache(cfg, max_cache_len=T + extra, policy=policy)
    elif cache_kind == "dynamic":
        cache = DynamicCache(config=cfg)
    else:
        cache = StaticCache(config=cfg, max_cache_len=T + extra)
    g = torch.Generator(device="cuda")
    for layer in range(cfg.num_hidden_layers):
        g.manual_seed(1000 + layer)
        k = torch.randn(B, cfg.num_key_value_heads, T, cfg.head_dim, device="cuda", generator=g).to(torch.bfloat16)
        v = torch.randn(B, cfg.num_key_value_heads, T, cfg.head_dim, device="cuda", generator=g).to(torch.bfloat16)
        if cache_kind == "hydra":
            cache.layers[layer].load(k, v)
        else:
            cache.update(k, v, layer)
        del k, v
    return cache


def kernel_time_ms(step, n=5):
    """GPU kernel time of one step (sum of the device time of every kernel and copy the
    profiler records, over n steps, divided by n): what the step costs without host gaps."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    total_us = sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return total_us / n / 1e3


def measure(model, cfg, impl, cache_kind, B, T, rep_ms, extra, policy=None):
    model.set_attn_implementation(impl)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cache = fill(cache_kind, cfg, B, T, extra, policy)
    tok = torch.randint(1, cfg.vocab_size, (B, 1), device="cuda", generator=torch.Generator(device="cuda").manual_seed(T))
    state = {"tok": tok}

    def step():
        out = model(input_ids=state["tok"], past_key_values=cache, use_cache=True, logits_to_keep=1)
        state["tok"] = out.logits[:, -1].argmax(-1, keepdim=True)

    with torch.no_grad():
        step()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(step, warmup=50, rep=rep_ms, return_mode="median")
        finite = bool(torch.isfinite(model(input_ids=state["tok"], past_key_values=cache, use_cache=True,
                                           logits_to_keep=1).logits).all())
        kernel_ms = kernel_time_ms(step)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    steps = cache.get_seq_length() - T
    del cache, state
    gc.collect()
    torch.cuda.empty_cache()
    return {"name": f"{impl}_{cache_kind}" if impl == "sdpa" else "hydra_generate", "B": B, "T": T,
            "layers": cfg.num_hidden_layers, "cache": cache_kind, "step_ms": round(ms, 4),
            "tokens_per_s": round(B / (ms / 1e3), 1), "peak_mem_bytes": int(peak), "steps_run": int(steps),
            "kernel_ms": round(kernel_ms, 4),
            "logits_finite": finite}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="evidence JSON to write")
    ap.add_argument("--T", default="32768,131072", help="context lengths")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rep", type=int, default=400, help="do_bench rep (ms) per configuration")
    ap.add_argument("--dense-layers", type=int, default=0,
                    help="HydraPolicy.dense_layers (the preset's 2 would make half of a 4-layer model dense; "
                         "in the 32-layer model they are 2 of 32)")
    args = ap.parse_args()
    Ts = [int(x) for x in args.T.split(",")]
    extra = 4096  # headroom for the steps do_bench runs
    ht.register()
    policy = hydra.HydraPolicy(dense_layers=args.dense_layers)
    model, cfg = build_model(args.layers, max(Ts) + extra)
    props = torch.cuda.get_device_properties(0)
    log(f"device {props.name}; torch {torch.__version__}; B={args.B}, {args.layers} layers of Llama-3-8B shape")
    rows = []
    for T in Ts:
        res = {}
        for impl, kind in (("hydra", "hydra"), ("sdpa", "dynamic"), ("sdpa", "static")):
            r = measure(model, cfg, impl, kind, args.B, T, args.rep, extra, policy)
            res[kind] = r
            rows.append(r)
            log(f"T={T:>6} {r['name']:>15}: {r['step_ms']:8.3f} ms/step  {r['tokens_per_s']:9.1f} tok/s  "
                f"kernels {r['kernel_ms']:8.3f} ms  peak {r['peak_mem_bytes'] / 2**30:6.2f} GiB  steps {r['steps_run']}  "
                f"finite {r['logits_finite']}")
        best = min((res["dynamic"], res["static"]), key=lambda r: r["step_ms"])
        rows.append(dict(best, name="sdpa_generate"))
        res["hydra"]["speedup_vs_sdpa"] = round(best["step_ms"] / res["hydra"]["step_ms"], 3)
        res["hydra"]["sdpa_cache"] = best["cache"]
        log(f"T={T:>6} hydra vs sdpa ({best['cache']}): {res['hydra']['speedup_vs_sdpa']:.2f}x")
    if args.out:
        write_evidence(args.out, kind="generate_bench", command=shlex.join([sys.executable] + sys.argv), rows=rows,
                       extra={"model": "Llama-3-8B shapes (hidden 4096, 32/8 heads, D=128, MLP 14336, vocab 128256), "
                                       f"{args.layers} layers, bf16, random weights",
                              "gpu": props.name, "hydra_policy": f"precision='high', dense_layers={args.dense_layers}", "transformers": __import__("transformers").__version__,
                              "method": "one decode step per call through model.forward (logits_to_keep=1) + argmax; "
                                        "caches filled with random K/V; do_bench medians"})
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
