"""hydra inside transformers: greedy generation through ``attn_implementation="hydra"``.

A tiny Llama is built from a config with random weights (no downloads). On CPU the
attention function runs hydra.reference; on a GPU the kernels (bf16). The lm_head is
scaled up so that greedy choices are decisive: a bf16 rounding difference between two
correct attention implementations cannot flip a token.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
hydra = pytest.importorskip("hydra")
ht = pytest.importorskip("hydra.integrations.transformers")

from transformers import LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# A policy small enough that these short contexts select pages (budget 48 tokens of 8-token
# pages, 8 sink and 8 recent tokens, no dense layers).
SMALL = hydra.HydraPolicy(page_size=8, budget_tokens=48, sink_tokens=8, recent_tokens=8, dense_layers=0)


def _config(**kw):
    base = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def _models(device, dtype, impl="hydra", seed=0, **cfg):
    """The same random weights under SDPA and under ``impl``."""
    ht.register()
    cfg = _config(**cfg)
    torch.manual_seed(seed)
    ref = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():
        ref.lm_head.weight.mul_(16.0)
    ref = ref.to(device=device, dtype=dtype).eval()
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl, dtype=dtype).to(device).eval()
    model.load_state_dict(ref.state_dict())
    return ref, model


def _prompt(B, T, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 512, (B, T), generator=g).to(device)


def _left_pad(seqs, device):
    """Left-padded batch and mask from a list of 1-D token tensors."""
    W = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), W, dtype=torch.long)
    mask = torch.zeros(len(seqs), W, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, W - len(s):] = s.cpu()
        mask[i, W - len(s):] = 1
    return ids.to(device), mask.to(device)


GEN = dict(max_new_tokens=16, do_sample=False)
DEVICES = [pytest.param("cpu", torch.float32, id="cpu-reference"),
           pytest.param("cuda", torch.bfloat16, id="cuda-kernels", marks=[requires_cuda, pytest.mark.gpu])]


@pytest.fixture(autouse=True)
def _default_policy():
    hydra.integrations.attention.set_defaults("high", None)
    yield
    hydra.integrations.attention.set_defaults("high", None)


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("cache", ["dynamic", "hydra"])
def test_generate_equals_sdpa_when_context_fits_budget(device, dtype, cache):
    ref, model = _models(device, dtype)
    ids = _prompt(2, 77, seed=1, device=device)
    want = ref.generate(ids, **GEN)
    kw = {"past_key_values": ht.HydraCache(model.config, max_cache_len=128)} if cache == "hydra" else {}
    got = model.generate(ids, **GEN, **kw)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device,dtype", DEVICES)
@pytest.mark.parametrize("cache", ["dynamic", "hydra"])
def test_left_padded_batch_equals_each_sequence(device, dtype, cache):
    """Selection active (contexts 2-4x the budget): a left-padded batch generates what each
    sequence generates alone, so padding is neither attended nor summarised."""
    ht.set_defaults(policy=SMALL)
    _, model = _models(device, dtype, seed=3)
    seqs = [_prompt(1, n, seed=10 + n, device=device)[0] for n in (130, 61, 97)]
    ids, mask = _left_pad(seqs, device)

    def run(i, m, B):
        kw = {"past_key_values": ht.HydraCache(model.config, max_cache_len=160, policy=SMALL)} if cache == "hydra" \
            else {}
        return model.generate(i, attention_mask=m, **GEN, **kw)

    batched = run(ids, mask, len(seqs))[:, ids.shape[1]:]
    for i, s in enumerate(seqs):
        alone = run(s.view(1, -1), torch.ones(1, len(s), dtype=torch.long, device=device), 1)[:, len(s):]
        assert torch.equal(batched[i], alone[0]), f"sequence {i}"


def test_attention_function_decode_matches_reference():
    """hydra_attention on one decode step with a left-padded mask equals hydra.reference with
    cache_leftpad, and returns (B, S, Hq, D)."""
    ht.set_defaults(policy=SMALL)

    class Attn(torch.nn.Module):
        layer_idx = 1

    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 8, 1, 64, generator=g)
    k = torch.randn(3, 2, 150, 64, generator=g)
    v = torch.randn(3, 2, 150, 64, generator=g)
    mask = torch.ones(3, 150, dtype=torch.bool)
    mask[1, :40] = False
    mask[2, :149] = False
    out, weights = hydra.hydra_attention(Attn(), q, k, v, mask, scaling=0.1)
    assert weights is None and out.shape == (3, 1, 8, 64)
    want = hydra.reference.hydra(q, k, v, policy=SMALL, policy_layer_idx=1, scale=0.1,
                                 cache_seqlens=torch.full((3,), 150, dtype=torch.int32),
                                 cache_leftpad=torch.tensor([0, 40, 149], dtype=torch.int32))
    assert torch.equal(out, want.transpose(1, 2))


def test_hub_form_loads_the_function_by_name(monkeypatch):
    """attn_implementation="Frosty40/hydra:hydra_attention": transformers fetches the kernel
    with kernels.get_kernel and takes the named function (the fetch is replaced by this
    checkout: no network here)."""
    pytest.importorskip("kernels")
    import transformers.integrations.hub_kernels as hk

    monkeypatch.setattr(hk, "get_kernel", lambda repo_id, **kw: hydra if repo_id == "Frosty40/hydra" else None)
    ref, model = _models("cpu", torch.float32, impl="Frosty40/hydra:hydra_attention")
    ids = _prompt(1, 50, seed=5, device="cpu")
    assert torch.equal(model.generate(ids, **GEN), ref.generate(ids, **GEN))


def test_clear_errors():
    _, model = _models("cpu", torch.float32)
    ids = _prompt(2, 20, seed=6, device="cpu")
    right = torch.ones(2, 20, dtype=torch.long)
    right[1, 15:] = 0
    with pytest.raises(ValueError, match="left padding only"):
        model.generate(ids, attention_mask=right, **GEN)
    with pytest.raises(ValueError, match="max_cache_len=24"):
        model.generate(ids, past_key_values=ht.HydraCache(model.config, max_cache_len=24), **GEN)
    sdpa_model = LlamaForCausalLM._from_config(_config(), attn_implementation="sdpa").eval()
    with pytest.raises(RuntimeError, match="needs attn_implementation='hydra'"):
        sdpa_model.generate(ids, past_key_values=ht.HydraCache(sdpa_model.config, max_cache_len=64), **GEN)

    class Attn(torch.nn.Module):
        layer_idx = 0

    q = torch.randn(1, 8, 1, 64)
    kv = torch.randn(1, 2, 10, 64)
    with pytest.raises(ValueError, match="no attention dropout, got dropout=0.1"):
        hydra.hydra_attention(Attn(), q, kv, kv, None, dropout=0.1)
    with pytest.raises(ValueError, match="2-D .* padding mask"):
        hydra.hydra_attention(Attn(), q, kv, kv, torch.ones(1, 1, 1, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_cache_len must be a positive int"):
        ht.HydraCache(model.config, max_cache_len=0)


@pytest.mark.parametrize("device,dtype", DEVICES)
def test_sliding_window_layers(device, dtype):
    """Mistral-style sliding window (the model passes sliding_window): hydra attends exactly
    the window, as SDPA does, with DynamicCache's sliding layers and with HydraCache."""
    from transformers import MistralConfig, MistralForCausalLM

    ht.register()
    cfg = MistralConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=64, sliding_window=40,
                        max_position_embeddings=2048)
    torch.manual_seed(7)
    ref = MistralForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():
        ref.lm_head.weight.mul_(16.0)
    ref = ref.to(device=device, dtype=dtype).eval()
    model = MistralForCausalLM._from_config(cfg, attn_implementation="hydra", dtype=dtype).to(device).eval()
    model.load_state_dict(ref.state_dict())
    ids = _prompt(1, 90, seed=8, device=device)
    want = ref.generate(ids, **GEN)
    assert torch.equal(model.generate(ids, **GEN), want)
    assert torch.equal(model.generate(ids, past_key_values=ht.HydraCache(cfg, max_cache_len=128), **GEN), want)


@requires_cuda
@pytest.mark.gpu
def test_static_cache_compiled_with_cuda_graphs():
    """StaticCache on CUDA: generate compiles the decode step (mode "reduce-overhead": CUDA
    graphs) with hydra_attention inside, left padding included, and matches SDPA."""
    ref, model = _models("cuda", torch.bfloat16, seed=9)
    seqs = [_prompt(1, n, seed=20 + n, device="cuda")[0] for n in (70, 45)]
    ids, mask = _left_pad(seqs, "cuda")
    gen = dict(GEN, cache_implementation="static")
    want = ref.generate(ids, attention_mask=mask, **GEN)
    got = model.generate(ids, attention_mask=mask, **gen)
    assert torch.equal(got, want)
    assert model._compiled_call is not None, "generate did not compile the decode step"


@requires_cuda
@pytest.mark.gpu
def test_torch_compile_and_graph_capture_of_a_decode_step():
    """hydra_attention on a StaticCache-shaped decode step (left padding, selection active):
    torch.compile(fullgraph=True) and a captured CUDA graph both equal eager."""
    ht.set_defaults(policy=hydra.HydraPolicy(budget_tokens=256, sink_tokens=16, recent_tokens=32, dense_layers=0))

    class Attn(torch.nn.Module):
        layer_idx = 2

    g = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(3, 16, 1, 128, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(3, 4, 2048, 128, device="cuda", generator=g).to(torch.bfloat16)
    v = torch.randn(3, 4, 2048, 128, device="cuda", generator=g).to(torch.bfloat16)
    mask = torch.ones(3, 1500, dtype=torch.bool, device="cuda")  # 1500 of 2048 static slots written
    mask[0, :300] = False
    mask[2, :1000] = False
    mod = Attn()
    eager, _ = hydra.hydra_attention(mod, q, k, v, mask, scaling=0.09)
    want = hydra.reference.hydra(q, k, v, policy=hydra.integrations.attention._DEFAULTS["policy"],
                                 policy_layer_idx=2, scale=0.09,
                                 cache_seqlens=torch.full((3,), 1500, dtype=torch.int32, device="cuda"),
                                 cache_leftpad=torch.tensor([300, 0, 1000], dtype=torch.int32, device="cuda"))
    err = ((eager.transpose(1, 2).double() - want.double()).norm() / want.double().norm()).item()
    assert err < 1e-2
    compiled = torch.compile(lambda q_, m_: hydra.hydra_attention(mod, q_, k, v, m_, scaling=0.09)[0], fullgraph=True)
    assert torch.equal(compiled(q, mask), eager)
    out = torch.full_like(eager, float("nan"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out.copy_(hydra.hydra_attention(mod, q, k, v, mask, scaling=0.09)[0])  # warm up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    out.fill_(float("nan"))
    with torch.cuda.graph(graph):
        out.copy_(hydra.hydra_attention(mod, q, k, v, mask, scaling=0.09)[0])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@requires_cuda
@pytest.mark.gpu
def test_long_prompts_run_the_sparse_prefill_kernel():
    """A prompt longer than the budget goes through hydra's prefill kernel, per sequence
    with its left padding cut off; a prompt within the budget stays dense SDPA."""
    pol = hydra.HydraPolicy(budget_tokens=256, sink_tokens=64, recent_tokens=64, dense_layers=0)
    ht.set_defaults(policy=pol)

    class Attn(torch.nn.Module):
        layer_idx = 3

    g = torch.Generator(device="cuda").manual_seed(12)
    q = torch.randn(2, 8, 700, 128, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(2, 2, 700, 128, device="cuda", generator=g).to(torch.bfloat16)
    v = torch.randn(2, 2, 700, 128, device="cuda", generator=g).to(torch.bfloat16)
    mask = torch.ones(2, 700, dtype=torch.bool, device="cuda")
    mask[1, :150] = False
    out, _ = hydra.hydra_attention(Attn(), q, k, v, mask, scaling=0.08)
    want0 = hydra.hydra(q[:1], k[:1], v[:1], policy=pol, policy_layer_idx=3, scale=0.08)
    want1 = hydra.hydra(q[1:, :, 150:], k[1:, :, 150:], v[1:, :, 150:], policy=pol, policy_layer_idx=3, scale=0.08)
    assert torch.equal(out[0], want0[0].transpose(0, 1))
    assert torch.equal(out[1, 150:], want1[0].transpose(0, 1))
    assert (out[1, :150] == 0).all()
    short, _ = hydra.hydra_attention(Attn(), q[:, :, :200], k[:, :, :200], v[:, :, :200], None, scaling=0.08)
    dense = torch.nn.functional.scaled_dot_product_attention(q[:, :, :200], k[:, :, :200], v[:, :, :200],
                                                             is_causal=True, scale=0.08, enable_gqa=True)
    assert torch.equal(short, dense.transpose(1, 2))
