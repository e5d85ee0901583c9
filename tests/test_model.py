"""The model's contract: logits (B, T, vocab_size), and a KV cache that changes nothing but the cost."""

from __future__ import annotations

import pytest
import torch

from minigpt_cli.config import ModelConfig
from minigpt_cli.kv_cache import KVCache
from minigpt_cli.model import (GPT, attention_probs, causal_conv, kv_bytes_per_token, visible_keys,
                               written_out_attention)

VOCAB = 37
SMALL = dict(n_layer=2, n_head=2, n_embd=16, block_size=24, dropout=0.0)
# Every option value appears at least once, in varied combinations.
VARIANTS = [
    dict(pos_encoding="learned", norm="layernorm", norm_placement="pre", activation="gelu", tie_weights=True),
    dict(pos_encoding="learned", norm="rmsnorm", norm_placement="post", activation="relu2"),
    dict(pos_encoding="sinusoidal", norm="layernorm", norm_placement="post", activation="gelu"),
    dict(pos_encoding="sinusoidal", norm="rmsnorm", norm_placement="pre", activation="relu2", tie_weights=True),
    dict(pos_encoding="rope", norm="layernorm", norm_placement="pre", activation="relu2", qk_norm=False),
    dict(pos_encoding="rope", norm="rmsnorm", norm_placement="post", activation="gelu", tie_weights=True),
    dict(pos_encoding="rope", bias=True, norm="layernorm", zero_init_proj=False, logit_softcap=15.0, mlp_ratio=2),
    dict(pos_encoding="rope", norm="rmsnorm", norm_placement="pre", activation="relu2", short_conv=4),
    dict(pos_encoding="learned", norm="layernorm", norm_placement="post", activation="gelu", short_conv=3),
]


def make_model(seed: int = 0, sdpa: bool = True, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**SMALL, **overrides}), VOCAB, sdpa=sdpa)
    # zero_init_proj starts every block as the identity, and short convolutions start at zero; random
    # weights exercise attention and the convolutions fully.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight") or ".conv_" in name:
                p.normal_(0.0, 0.1)
    return model.eval()


def variant_id(v: dict) -> str:
    return "-".join(f"{k}={val}" for k, val in v.items())


@pytest.mark.parametrize("variant", VARIANTS, ids=[variant_id(v) for v in VARIANTS])
def test_logits_shape_and_cache_equals_recompute(variant: dict):
    model = make_model(**variant)
    idx = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))  # (B, T)
    with torch.no_grad():
        full = model(idx)
        assert full.shape == (3, 20, VOCAB)
        assert torch.isfinite(full).all()
        # Prefill 12 positions, then feed one at a time: every step's logits are (B, 1, vocab_size).
        cache = model.new_kv_cache(3)
        parts = [model(idx[:, :12], cache)]
        assert parts[0].shape == (3, 12, VOCAB)
        for t in range(12, 20):
            step = model(idx[:, t:t + 1], cache)
            assert step.shape == (3, 1, VOCAB)
            parts.append(step)
        assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_after_cached_positions_matches():
    model = make_model()
    idx = torch.randint(0, VOCAB, (2, 18), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(2)
        first = model(idx[:, :5], cache)
        rest = model(idx[:, 5:], cache)  # several new positions after cached ones
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_is_preallocated_and_reports_its_size():
    model = make_model()
    cache = model.new_kv_cache(2)
    assert isinstance(cache, KVCache)
    assert cache.block_size == SMALL["block_size"]
    per_layer = 2 * SMALL["n_head"] * SMALL["block_size"] * (SMALL["n_embd"] // SMALL["n_head"])
    assert cache.nbytes == 2 * SMALL["n_layer"] * per_layer * 4
    cache.advance(5)
    cache.reset()
    assert cache.length == 0


def test_sequence_longer_than_block_size_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, SMALL["block_size"] + 1, dtype=torch.long))
    cache = model.new_kv_cache(1)
    with torch.no_grad():
        model(torch.zeros(1, SMALL["block_size"], dtype=torch.long), cache)
        with pytest.raises(ValueError):
            model(torch.zeros(1, 1, dtype=torch.long), cache)


@pytest.mark.parametrize("short_conv", [0, 3])
def test_positions_are_causal(short_conv: int):
    """Changing a later token never changes the logits of earlier positions."""
    model = make_model(short_conv=short_conv)
    idx = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_a_short_convolution_mixes_each_channels_last_k_values():
    """causal_conv is the written-out sum y[t] = sum_j w[j] x[t - k + 1 + j] per channel, zeros before
    the start; a model's convolutions start at zero, so it starts as the same model without them."""
    x = torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(4))
    weight = torch.randn(3, 1, 4, generator=torch.Generator().manual_seed(5))
    padded = torch.cat([torch.zeros(2, 3, 3), x], dim=1)  # (B, k - 1 + T, C)
    expected = torch.stack([sum(weight[:, 0, j] * padded[:, t + j] for j in range(4)) for t in range(7)], dim=1)
    torch.testing.assert_close(causal_conv(x, weight), expected)
    torch.manual_seed(0)
    plain = GPT(ModelConfig(**SMALL), VOCAB)
    torch.manual_seed(0)
    with_conv = GPT(ModelConfig(**SMALL, short_conv=3), VOCAB)
    assert all((p == 0).all() for n, p in with_conv.named_parameters() if ".conv_" in n)
    with_conv.load_state_dict(plain.state_dict(), strict=False)
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(with_conv(idx), plain(idx))


def test_a_cache_for_short_convolutions_keeps_each_sublayers_inputs():
    model = make_model(short_conv=3)
    cache = model.new_kv_cache(2)
    assert cache.inputs.shape == (2 * SMALL["n_layer"], 2, SMALL["block_size"], SMALL["n_embd"])
    assert cache.nbytes == kv_bytes_per_token(model.config) * SMALL["block_size"] * 2
    assert make_model().new_kv_cache(2).inputs is None


def test_tied_weights_share_one_tensor():
    model = make_model(tie_weights=True)
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


def test_dropout_only_in_training_mode():
    model = make_model(dropout=0.5)
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(idx), model(idx))
        model.train()
        torch.manual_seed(0)
        a = model(idx)
        torch.manual_seed(1)
        b = model(idx)
    assert not torch.equal(a, b)


def test_model_holds_no_inference_state():
    """Building the fast decoder from a model and sampling with it leave the model as it was:
    the same modules, parameters, buffers and state, and no cache or decoder hung on it."""
    from minigpt_cli.inference import Decoder
    from minigpt_cli.sampler import SamplingSettings, generate

    model = make_model(tie_weights=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(name, type(m), sorted(vars(m)), m.training) for name, m in model.named_modules()]
    params = [(name, p, p.dtype, p.stride(), p.requires_grad) for name, p in model.named_parameters()]
    for dtype in (torch.float32, torch.bfloat16):
        decoder = Decoder(model, dtype)
        steps = list(generate(decoder, [1, 2, 3], 30, SamplingSettings(temperature=1.0), num_samples=2))
        assert len(steps) == 30
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), model.new_kv_cache(1))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert [(name, type(m), sorted(vars(m)), m.training) for name, m in model.named_modules()] == modules
    assert [(name, p, p.dtype, p.stride(), p.requires_grad) for name, p in model.named_parameters()] == params


@pytest.mark.parametrize("variant", VARIANTS + [dict(dropout=0.0, qk_norm=False, pos_encoding="learned")],
                         ids=[variant_id(v) for v in VARIANTS] + ["plain"])
def test_sdpa_equals_the_written_out_attention(variant: dict):
    """F.scaled_dot_product_attention is the textbook product, for a whole window, a prefill
    followed by one-position steps, and a chunk after cached positions."""
    written, sdpa = make_model(sdpa=False, **variant), make_model(**variant)
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(idx), written(idx), rtol=1e-5, atol=1e-5)
        for model in (written, sdpa):
            cache = model.new_kv_cache(2)
            parts = [model(idx[:, :8], cache), model(idx[:, 8:9], cache), model(idx[:, 9:], cache)]
            torch.testing.assert_close(torch.cat(parts, dim=1), written(idx), rtol=1e-5, atol=1e-5)


def test_attention_probabilities_are_causal_rows_that_sum_to_one():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=generator) for _ in range(3))  # (B, n_head, T, head_dim)
    probs = attention_probs(q, k, visible_keys(10, 0, q.device))  # (B, n_head, T, T)
    assert probs.shape == (2, 3, 10, 10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 10))
    future = ~visible_keys(10, 0, q.device)
    assert (probs.masked_select(future) == 0).all() and (probs.masked_select(~future) > 0).all()
    torch.testing.assert_close(written_out_attention(q, k, v, visible_keys(10, 0, q.device)),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_greedy_generation_with_cache_equals_without():
    from minigpt_cli.sampler import SamplingSettings, generate

    model = make_model(block_size=16)
    greedy = SamplingSettings(temperature=0.0)
    prompt = [1, 2, 3, 4, 5]

    def tokens(use_cache: bool) -> list[int]:
        # 40 new tokens: the window slides past block_size=16 several times.
        return [s.tokens.item() for s in generate(model, prompt, 40, greedy, use_cache=use_cache)]

    assert tokens(True) == tokens(False)


@pytest.mark.parametrize("variant", VARIANTS[3:6], ids=[variant_id(v) for v in VARIANTS[3:6]])
def test_a_layers_attention_weights_reproduce_its_output(variant: dict):
    """qkv and attention_probs give the weights the layer really uses: weighting the values by
    them and projecting gives the attention module's own output."""
    model = make_model(**variant)
    attn, T = model.blocks[0].attn, 12
    x = torch.randn(2, T, SMALL["n_embd"], generator=torch.Generator().manual_seed(6))
    rope = (model.rope_cos[:T], model.rope_sin[:T]) if model.rope_cos is not None else None
    with torch.no_grad():
        q, k, v = attn.qkv(x, rope)
        probs = attention_probs(q, k, visible_keys(T, 0, x.device))  # (B, n_head, T, T)
        y = (probs @ v).transpose(1, 2).reshape(2, T, SMALL["n_embd"])
        torch.testing.assert_close(attn.c_proj(y), attn(x, rope, None, 0), rtol=1e-5, atol=1e-5)
