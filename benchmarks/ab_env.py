#!/usr/bin/env python3
"""A/B of configurations that differ in environment variables or in the source tree.

Each configuration runs in a fresh process, so variables read once per process (the
launchers' knobs, e.g. HYDRA_CLUSTER_SELECT=0 or HYDRA_CS_CTAS=8) take effect. A
configuration's reserved key ``"tree"`` names another source tree to import hydra from
(its own just-in-time build, cached by its sources), so two revisions compare in one
run: ``git archive REV csrc torch-ext | tar -x -C /tmp/old`` and then
``--configs '{"new": {}, "old": {"tree": "/tmp/old"}}'``. The
configurations alternate within each round, so drift of the machine spreads over all of
them. For each shape and summary type (16-bit, e4m3) a process reports the graph-replay
median (``triton.testing.do_bench``, as the decode benchmark) of

* ``step``: ``hydra.hydra(q, k, v, page_summaries=...)``, the whole decode step, and
* ``select``: ``hydra.select_pages(...)``, scoring and selection alone,
* ``stateless`` (with ``--stateless``, 16-bit rows): ``hydra.hydra(q, k, v)`` without
  summaries, scores straight from K,
* ``hier`` (with ``--hier``): the coarse-to-fine step over 8-token pages (superpages of
  16 pages, a shortlist of 4x the budget, as the decode benchmark's ``hydra_hier`` rows),
  with ``hier_select`` its scoring and two-stage selection alone,

and whether the first sequence's pages equal ``hydra.reference.select_pages``. With
``--host`` a process instead times the eager host overhead of each shape (eager minus
graph, back to back, as the decode benchmark's SPEC 7 check), its host us a call, and
the host us a call of the same call with ``out=``, a sliding window and left padding.
It is the committed form of the harness behind benchmarks/NOTES.md's A/B tables
(v14-v18 ran earlier, uncommitted copies of it).

    python3 benchmarks/ab_env.py --shapes 1x131072,1x131072x16x2x256 \\
        --configs '{"base": {}, "no_cluster": {"HYDRA_CLUSTER_SELECT": "0"}}' --rounds 2

Shapes are ``BxT`` (Hq = 32, Hkv = 8, D = 128) or ``BxTxHqxHkvxD``; bf16, precision "high".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        parts = [int(x) for x in item.lower().split("x")]
        if len(parts) == 2:
            parts += [32, 8, 128]
        if len(parts) != 5:
            raise SystemExit(f"ab_env: a shape is BxT or BxTxHqxHkvxD, got {item!r}")
        shapes.append(tuple(parts))
    return shapes


def hier_policy(hydra):
    """The decode benchmark's hydra_hier policy (its hier_policies): 8-token pages,
    superpages of 16, a 4x shortlist, its budget, sink and recent window."""
    return hydra.HydraPolicy(page_size=8, budget_tokens=4096, sink_tokens=64, recent_tokens=512, superpage=16,
                             shortlist=4)


def host_rows(hydra, B, T, Hq, Hkv, D, hier=False):
    """Eager against graph, back to back, for the plain call ``hydra.hydra(q, k, v,
    page_summaries=s)`` on four input sets in turn (so no set stays in L2): medians of
    five trials of device us per call, and the host us per call of the eager trials; then
    the host us per call of three variants of the call (``variants`` below: out given, a
    sliding window, left padding). hier: also eager and graph back to back for the
    coarse-to-fine step (the decode benchmark's hydra_hier policy, 16-bit summaries)."""
    import statistics

    import torch
    from timing import back_to_back_us, capture_graph, rotating

    sets = []
    for i in range(4):
        g = torch.Generator(device="cuda").manual_seed(1000 + i)
        q = torch.randn(B, Hq, 1, D, device="cuda", generator=g).to(torch.bfloat16)
        k = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(torch.bfloat16)
        v = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(torch.bfloat16)
        lens = torch.full((B,), T, dtype=torch.int32, device="cuda")
        pad = torch.full((B,), T // 8, dtype=torch.int32, device="cuda")
        sets.append((q, k, v, hydra.page_summaries(k), torch.empty_like(q), lens, pad,
                     hydra.page_summaries(k, cache_seqlens=lens, cache_leftpad=pad)))
    calls = [lambda s=s: hydra.hydra(s[0], s[1], s[2], page_summaries=s[3]) for s in sets]
    # Variants of the same call: trees before v30 send them through the checked path (the
    # Python checks, then the same kernels), later ones through the fast path (the op
    # checks in C++).
    W = T // 2
    variants = {  # one call list a variant, each call one lambda deep like `calls`
        "host_out": [lambda s=s: hydra.hydra(s[0], s[1], s[2], page_summaries=s[3], out=s[4]) for s in sets],
        "host_window": [lambda s=s: hydra.hydra(s[0], s[1], s[2], page_summaries=s[3], sliding_window=W)
                        for s in sets],
        "host_leftpad": [lambda s=s: hydra.hydra(s[0], s[1], s[2], page_summaries=s[7], cache_seqlens=s[5],
                                                 cache_leftpad=s[6]) for s in sets],
    }
    graphs = [capture_graph(fn)[0] for fn in calls]
    eager, graph, host = [], [], {name: [] for name in variants}
    for _ in range(5):  # alternating, so that a drift of the process spreads over all of them
        eager.append(back_to_back_us(rotating(calls)))
        graph.append(back_to_back_us(rotating([gr.replay for gr in graphs])))
        for name, fns in variants.items():
            host[name].append(back_to_back_us(rotating(fns))[1])
    e_dev = statistics.median(t[0] for t in eager)
    g_dev = statistics.median(t[0] for t in graph)
    res = {"eager_b2b": round(e_dev, 2), "graph_b2b": round(g_dev, 2), "overhead": round(e_dev - g_dev, 2),
           "host": round(statistics.median(t[1] for t in eager), 2),
           **{name: round(statistics.median(v), 2) for name, v in host.items()}}
    if hier:
        graphs = None  # the flat call's graphs are timed; free them before capturing more
        pol = hier_policy(hydra)
        hsets = []
        for s in sets:
            s8 = hydra.page_summaries(s[1], page_size=8)
            hsets.append((s[0], s[1], s[2], s8, hydra.superpage_summaries(s8, 16)))
        hcalls = [lambda s=s: hydra.hydra(s[0], s[1], s[2], policy=pol, page_summaries=s[3], superpage_summaries=s[4])
                  for s in hsets]
        hgraphs = [capture_graph(fn)[0] for fn in hcalls]
        he, hg = [], []
        for _ in range(5):
            he.append(back_to_back_us(rotating(hcalls)))
            hg.append(back_to_back_us(rotating([gr.replay for gr in hgraphs])))
        res["hier_eager_b2b"] = round(statistics.median(t[0] for t in he), 2)
        res["hier_graph_b2b"] = round(statistics.median(t[0] for t in hg), 2)
        res["hier_host"] = round(statistics.median(t[1] for t in he), 2)
    return res


def child(shapes, tree, stateless=False, host=False, hier=False):
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(Path(tree) / "torch-ext"))
    import torch
    import hydra
    import hydra.reference as ref
    from timing import graph_us

    here = Path(hydra.__file__).resolve().parents[1]
    if here != (Path(tree) / "torch-ext").resolve():
        raise SystemExit(f"ab_env: imported hydra from {here}, not from the tree {tree}")

    res = {}
    for B, T, Hq, Hkv, D in shapes:
        if host:  # the eager host-overhead rows only
            key = f"host_{B}x{T}" + ("" if (Hq, Hkv, D) == (32, 8, 128) else f"_{Hq}/{Hkv}/{D}")
            res[key] = host_rows(hydra, B, T, Hq, Hkv, D, hier)
            torch.cuda.empty_cache()
            continue
        g = torch.Generator(device="cuda").manual_seed(T + B)
        q = torch.randn(B, Hq, 1, D, device="cuda", generator=g).to(torch.bfloat16)
        k = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(torch.bfloat16)
        v = torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(torch.bfloat16)
        for name, summ in (("s16", hydra.page_summaries(k)),
                           ("e4m3", hydra.page_summaries(k, dtype=torch.float8_e4m3fn))):
            out = torch.full_like(q, float("nan"))
            step = graph_us(lambda: hydra.hydra(q, k, v, page_summaries=summ, out=out))
            select = graph_us(lambda: hydra.select_pages(q, k, page_summaries=summ))
            pages = hydra.select_pages(q, k, page_summaries=summ)[:1]
            want = ref.select_pages(q[:1].float(), k[:1].float(), page_summaries=summ[:1])
            same = want.shape == pages.shape and bool(torch.equal(pages.cpu(), want.to(pages.dtype).cpu()))
            key = f"{name}_{B}x{T}" + ("" if (Hq, Hkv, D) == (32, 8, 128) else f"_{Hq}/{Hkv}/{D}")
            res[key] = {"step": round(step, 2), "select": round(select, 2), "pages_match_ref": same}
            if stateless and name == "s16":  # page_summaries=None: scores straight from K
                res[key]["stateless"] = round(graph_us(lambda: hydra.hydra(q, k, v, out=out)), 2)
            if hier:  # coarse-to-fine over 8-token pages, the decode benchmark's hydra_hier policy
                pol = hier_policy(hydra)
                s8 = hydra.page_summaries(k, page_size=8, dtype=summ.dtype if name == "e4m3" else None)
                ss = hydra.superpage_summaries(s8, 16)
                res[key]["hier"] = round(graph_us(lambda: hydra.hydra(
                    q, k, v, policy=pol, page_summaries=s8, superpage_summaries=ss, out=out)), 2)
                res[key]["hier_select"] = round(graph_us(lambda: hydra.select_pages(
                    q, k, policy=pol, page_summaries=s8, superpage_summaries=ss)), 2)
                got = hydra.select_pages(q, k, policy=pol, page_summaries=s8, superpage_summaries=ss)[:1]
                want = ref.select_pages(q[:1].float(), k[:1].float(), policy=pol, page_summaries=s8[:1],
                                        superpage_summaries=ss[:1])
                res[key]["hier_pages_match_ref"] = want.shape == got.shape and bool(
                    torch.equal(got.cpu(), want.to(got.dtype).cpu()))
                s8 = ss = None
        q = k = v = summ = out = None  # free this shape's tensors before the next
        torch.cuda.empty_cache()
    print("RESULT " + json.dumps(res), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1x32768,1x131072,1x524288,8x131072")
    p.add_argument("--configs", default='{"base": {}}', help="JSON: {name: {ENV_VAR: value, ...}, ...}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--stateless", action="store_true", help="also time the stateless step (16-bit rows)")
    p.add_argument("--hier", action="store_true", help="also time the coarse-to-fine step (8-token pages)")
    p.add_argument("--host", action="store_true",
                   help="time only the eager host overhead (eager minus graph, back to back) of each shape")
    p.add_argument("--out", default=None, help="also write every result to this JSON file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", default=str(REPO), help=argparse.SUPPRESS)
    args = p.parse_args()
    shapes = parse_shapes(args.shapes)
    if args.child:
        child(shapes, args.tree, args.stateless, args.host, args.hier)
        return
    configs = json.loads(args.configs)
    for name, env_add in configs.items():
        tree = env_add.get("tree")
        if tree is not None and not (Path(tree) / "torch-ext" / "hydra" / "__init__.py").is_file():
            raise SystemExit(f"ab_env: config {name!r}: tree {tree!r} has no torch-ext/hydra/__init__.py")
    results = []
    for rnd in range(args.rounds):
        for name, env_add in configs.items():
            env = dict(os.environ, **{k: str(v) for k, v in env_add.items() if k != "tree"})
            tree = str(Path(env_add.get("tree", REPO)).resolve())
            t0 = time.time()
            r = subprocess.run([sys.executable, __file__, "--child", "--shapes", args.shapes, "--tree", tree]
                               + (["--stateless"] if args.stateless else []) + (["--host"] if args.host else [])
                               + (["--hier"] if args.hier else []),
                               env=env, capture_output=True, text=True)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(f"{name} round {rnd}: FAILED\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}", flush=True)
                continue
            d = json.loads(line[0][len("RESULT "):])
            results.append({"config": name, "round": rnd, **d})
            print(f"{name} round {rnd} ({time.time() - t0:.0f} s): {json.dumps(d)}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.host:
        print("\n| case | config | eager b2b (us) | graph b2b (us) | eager - graph (us) | host (us a call) | "
              "host: out given | host: sliding window | host: left padding |")
        print("|---|---|---|---|---|---|---|---|---|")
        for case in sorted({k for r in results for k in r if k not in ("config", "round")}):
            for name in configs:
                rs = [r[case] for r in results if r["config"] == name and case in r]
                for x in rs:
                    print(f"| {case} | {name} | {x['eager_b2b']} | {x['graph_b2b']} | {x['overhead']} | {x['host']} | "
                          f"{x['host_out']} | {x['host_window']} | {x['host_leftpad']} |"
                          + (f" hier: eager {x['hier_eager_b2b']}, graph {x['hier_graph_b2b']}, host {x['hier_host']}"
                             if "hier_host" in x else ""))
        return
    # One line a (case, config): the range of step and select over the rounds.
    cases = sorted({k for r in results for k in r if k not in ("config", "round")})
    print("\n| case | config | step (us) | select (us) | stateless step (us) | hier step (us) | hier select (us) "
          "| pages match |")
    print("|---|---|---|---|---|---|---|---|")
    for case in cases:
        for name in configs:
            rs = [r[case] for r in results if r["config"] == name and case in r]
            if not rs:
                continue
            st = sorted(x["step"] for x in rs)
            se = sorted(x["select"] for x in rs)
            sl = sorted(x["stateless"] for x in rs if "stateless" in x)
            hs = sorted(x["hier"] for x in rs if "hier" in x)
            hq = sorted(x["hier_select"] for x in rs if "hier_select" in x)
            match = all(x["pages_match_ref"] is True and x.get("hier_pages_match_ref", True) is True for x in rs)
            print(f"| {case} | {name} | {st[0]}-{st[-1]} | {se[0]}-{se[-1]} | "
                  f"{f'{sl[0]}-{sl[-1]}' if sl else '-'} | {f'{hs[0]}-{hs[-1]}' if hs else '-'} | "
                  f"{f'{hq[0]}-{hq[-1]}' if hq else '-'} | {match} |")


if __name__ == "__main__":
    main()
