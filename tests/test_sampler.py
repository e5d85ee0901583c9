"""Sampling: the KV-cached path equals the uncached reference, and the sampling rules do what they say."""

from __future__ import annotations

import math
import subprocess

import pytest
import torch

from conftest import assert_usage_error, cli_command, cli_env, invoke
from minigpt_cli.config import ModelConfig
from minigpt_cli.kv_cache import KVCache
from minigpt_cli import inference
from minigpt_cli.inference import Decoder, packing_supported
from minigpt_cli.model import GPT
from minigpt_cli.sampler import SamplingSettings, apply_repetition_penalty, generate, next_token, slide_keep

VOCAB = 11


def small_model(**options) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, zero_init_proj=False, **options)
    model = GPT(config, VOCAB).eval()
    with torch.no_grad():  # short convolutions start at zero: random ones exercise them
        for name, p in model.named_parameters():
            if ".conv_" in name:
                p.normal_(0.0, 0.5)
    return model


VARIANTS = [dict(pos_encoding=p, norm=n, norm_placement=pl)
            for p in ("learned", "sinusoidal", "rope") for n in ("layernorm", "rmsnorm") for pl in ("pre", "post")]
VARIANTS += [dict(pos_encoding="rope", norm="rmsnorm", norm_placement="pre", short_conv=4),
             dict(pos_encoding="learned", norm="layernorm", norm_placement="post", short_conv=2)]


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_cached_logits_equal_uncached_at_every_step_across_a_window_slide(options):
    model = small_model(**options)
    greedy = SamplingSettings(temperature=0.0)
    # 30 new tokens after 5 of prompt in a 12-position window: the window slides several times.
    cached = list(generate(model, [1, 2, 3, 4, 5], 30, greedy, use_cache=True))
    uncached = list(generate(model, [1, 2, 3, 4, 5], 30, greedy, use_cache=False))
    assert len(cached) == len(uncached) == 30
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.tokens, b.tokens)


INFERENCE_VARIANTS = VARIANTS + [
    # GPT-2 style (the sampling benchmark's shape): keys and values stored with one copy.
    dict(qk_norm=False, pos_encoding="learned", norm="layernorm", activation="gelu", tie_weights=True),
    dict(qk_norm=False, pos_encoding="sinusoidal", norm="rmsnorm", norm_placement="post", activation="relu2"),
    dict(qk_norm=True, activation="relu2", pos_encoding="rope", norm="rmsnorm"),
                                 dict(bias=True, logit_softcap=15.0, activation="gelu"),
                                 dict(tie_weights=True, bias=True, norm_placement="post", activation="relu2"),
    dict(short_conv=3, activation="relu2", pos_encoding="rope", norm="rmsnorm", qk_norm=True)]


@pytest.mark.parametrize("options", INFERENCE_VARIANTS, ids=lambda o: "-".join(str(v) for v in o.values()))
@pytest.mark.parametrize("pack_min", [0, 10**9], ids=["packed", "unpacked"])
@pytest.mark.parametrize("scripted", [True, False], ids=["scripted", "python"])
def test_inference_decode_step_equals_the_uncached_reference(options, pack_min, scripted, monkeypatch):
    """The Decoder's one-position step, with every matrix packed or none, scripted by TorchScript
    or run as Python, against the plain modules on the whole window, for batch 1 and for several
    samples sharing one prefill."""
    monkeypatch.setattr(inference, "PACK_MIN_ELEMENTS", pack_min)
    reference = small_model(**options)
    fast = Decoder(small_model(**options), torch.float32, script=scripted)
    assert fast.step is not None
    if not scripted:
        assert fast.scripted is None
    if packing_supported(torch.float32):
        assert (fast.model.blocks[0].mlp.c_fc.packed is not None) == (pack_min == 0)
    greedy = SamplingSettings(temperature=0.0)
    for samples in (1, 3):
        cached = list(generate(fast, [1, 2, 3, 4, 5], 30, greedy, num_samples=samples, use_cache=True))
        uncached = list(generate(reference, [1, 2, 3, 4, 5], 30, greedy, num_samples=samples, use_cache=False))
        assert len(cached) == len(uncached) == 30
        for a, b in zip(cached, uncached):
            torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
            assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["eager", "fixed-shapes"])
@pytest.mark.parametrize("scripted", [True, False], ids=["scripted", "python"])
def test_short_convolutions_decode_from_the_first_position(fixed_shapes, scripted):
    """A one-character prompt: the decode step's first positions have fewer than k earlier inputs,
    so its convolution reads a partial window (the zeros before the text)."""
    options = dict(short_conv=4, pos_encoding="rope", norm="rmsnorm")
    reference = small_model(**options)
    fast = Decoder(small_model(**options), torch.float32, script=scripted)
    if fixed_shapes:
        fast.compiled = fast.step  # the step torch.compile would compile, run eagerly
    greedy = SamplingSettings(temperature=0.0)
    cached = list(generate(fast, [3], 8, greedy, use_cache=True))
    uncached = list(generate(reference, [3], 8, greedy, use_cache=False))
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)


def test_the_decode_step_is_built_on_the_models_device_and_refuses_a_cache_without_conv_inputs():
    with torch.device("meta"):
        model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, short_conv=3), VOCAB)
    step = inference.DecodeStep(inference.inference_copy(model, torch.float32, pack=False), torch.float32)
    assert all(w.device.type == "meta" for w in step.conv_weights) and len(step.conv_weights) == 4
    fast = Decoder(small_model(short_conv=3), torch.float32)
    bare = KVCache(2, 1, 2, 12, 8)  # keys and values only
    bare.advance(1)
    with pytest.raises(ValueError, match="short convolutions"):
        fast(torch.tensor([[1]]), bare)


@pytest.mark.parametrize("options", INFERENCE_VARIANTS[-6:], ids=lambda o: "-".join(str(v) for v in o.values()))
@pytest.mark.parametrize("pack_min", [0, 10**9], ids=["packed", "unpacked"])
@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["eager", "fixed-shapes"])
def test_inference_rows_differ_after_a_shared_prefill(options, pack_min, fixed_shapes, monkeypatch):
    """Batch-1 prefill shared by 3 rows, then each row decodes its own tokens: every row's logits
    equal one full forward pass of that row's text (eager step, and the fixed-shape step torch.compile gets)."""
    monkeypatch.setattr(inference, "PACK_MIN_ELEMENTS", pack_min)
    reference = small_model(**options)
    fast = Decoder(small_model(**options), torch.float32)
    if fixed_shapes:
        fast.compiled = fast.step  # the step torch.compile would compile, run eagerly
    prompt = torch.tensor([[1, 2, 3, 4]])
    rows = torch.tensor([[5, 6, 7, 8, 9, 10, 1, 2], [9, 8, 7, 6, 5, 4, 3, 2], [0, 0, 1, 1, 2, 2, 3, 3]])
    with torch.inference_mode():
        cache = fast.new_kv_cache(3)
        fast(prompt, cache)
        for t in range(rows.shape[1]):
            got = fast(rows[:, t:t + 1], cache)[:, -1]  # (3, vocab_size)
            full = torch.cat([prompt.expand(3, -1), rows[:, :t + 1]], dim=1)
            torch.testing.assert_close(got, reference(full)[:, -1], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="exceeds block_size|KV cache full"):
            fast(rows[:, :1], cache)


@pytest.mark.parametrize("activation", ["gelu", "relu2"])
def test_activation_fused_into_the_packed_product_equals_the_model(activation, monkeypatch):
    """The MLP activation as oneDNN's post-op on the packed product (what bfloat16 steps use where
    oneDNN runs bfloat16), checked in float32 so that it is held to the plain model on any x86-64 CPU."""
    if not packing_supported(torch.float32):
        pytest.skip("oneDNN's packed linear does not run here")
    monkeypatch.setattr(inference, "PACK_MIN_ELEMENTS", 0)
    options = dict(activation=activation, pos_encoding="learned", qk_norm=False,
                   short_conv=3 if activation == "relu2" else 0)
    fast = Decoder(small_model(**options), torch.float32, script=False)
    fast.step.fuse_activation = True
    greedy = SamplingSettings(temperature=0.0)
    cached = list(generate(fast, [1, 2, 3, 4, 5], 20, greedy))
    uncached = list(generate(small_model(**options), [1, 2, 3, 4, 5], 20, greedy, use_cache=False))
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)


def test_an_activation_without_a_onednn_post_op_runs_after_the_product(monkeypatch):
    """A model activation missing from FUSED_ACTIVATIONS is computed by model.mlp_activation, unfused."""
    monkeypatch.setattr(inference, "FUSED_ACTIVATIONS", {})
    options = dict(activation="relu2", pos_encoding="learned", qk_norm=False)
    decoder = Decoder(small_model(**options), torch.bfloat16)
    assert not decoder.step.fuse_activation
    greedy = SamplingSettings(temperature=0.0)
    got = [s.logits for s in generate(decoder, [1, 2, 3], 10, greedy)]
    want = [s.logits for s in generate(small_model(**options), [1, 2, 3], 10, greedy, use_cache=False)]
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 0.05 * b.abs().max() + 0.02  # bfloat16's 3 digits, as above


def test_decode_step_runs_as_python_where_torchscript_fails(monkeypatch):
    def broken(module):
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(torch.jit, "script", broken)
    model = Decoder(small_model(pos_encoding="rope"), torch.float32)
    assert model.step is not None and model.scripted is None
    reference = small_model(pos_encoding="rope")
    greedy = SamplingSettings(temperature=0.0)
    got = [s.tokens.item() for s in generate(model, [1, 2, 3], 20, greedy)]
    assert got == [s.tokens.item() for s in generate(reference, [1, 2, 3], 20, greedy, use_cache=False)]


def test_compiled_decode_step_writes_the_same_text():
    model = Decoder(small_model(pos_encoding="rope"), torch.float32, compile=True)
    reference = small_model(pos_encoding="rope")
    greedy = SamplingSettings(temperature=0.0)
    compiled = [s.tokens.item() for s in generate(model, [1, 2, 3], 20, greedy)]
    assert compiled == [s.tokens.item() for s in generate(reference, [1, 2, 3], 20, greedy, use_cache=False)]


def test_prefill_then_steps_equal_one_forward_pass():
    model = small_model(pos_encoding="rope")
    idx = torch.randint(0, VOCAB, (3, 12))
    full = model(idx)  # (B, T, vocab_size)
    cache = model.new_kv_cache(3)
    parts = [model(idx[:, :4], cache)] + [model(idx[:, t:t + 1], cache) for t in range(4, 12)]
    assert parts[1].shape == (3, 1, VOCAB)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_is_allocated_once_per_generation(monkeypatch):
    model = small_model()
    made = []
    original = KVCache.__init__

    def counting(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(KVCache, "__init__", counting)
    pointers = set()
    for _ in generate(model, [1], 40, SamplingSettings(temperature=0.0), use_cache=True):
        pointers.add(made[0].k.data_ptr())
    assert len(made) == 1 and len(pointers) == 1
    assert made[0].k.shape[3] == model.config.block_size


def test_window_keeps_three_quarters_when_full():
    assert slide_keep(256) == 192
    assert slide_keep(4) == 3
    assert slide_keep(1) == 1


def test_bfloat16_weights_keep_greedy_text_close():
    model = small_model()
    reference = [s.tokens.item() for s in generate(model, [1, 2], 20, SamplingSettings(temperature=0.0))]
    half = Decoder(small_model(), torch.bfloat16)
    assert half.model.lm_head.weight.dtype == torch.bfloat16 and half.model.wte.weight.dtype == torch.float32
    logits = [s.logits for s in generate(half, [1, 2], 20, SamplingSettings(temperature=0.0))]
    assert all(torch.isfinite(x).all() for x in logits)
    agree = sum(a == b for a, b in zip(reference, [x.argmax().item() for x in logits]))
    assert agree >= 15


@pytest.mark.parametrize("activation", ["gelu", "relu2"])
def test_bfloat16_decode_step_is_the_same_scripted_as_python_and_with_fixed_shapes(activation):
    """In bfloat16 every matrix is packed where oneDNN runs, and the step fuses the activation into
    its product: scripted, as Python and in its fixed-shape form it computes the same logits, close
    to float32's."""
    options = dict(activation=activation, pos_encoding="learned", qk_norm=False)
    reference = small_model(**options)
    decoder = Decoder(small_model(**options), torch.bfloat16)
    if packing_supported(torch.bfloat16):
        assert decoder.step.fuse_activation and all(decoder.step.packed)
    runs = {"python": decoder.step, "fixed-shapes": decoder.step}
    if decoder.scripted is not None:
        runs["scripted"] = decoder.scripted
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    got = {}
    with torch.inference_mode():
        want = reference(tokens)[0]  # (T, vocab_size), float32
        for name, step in runs.items():
            cache = decoder.new_kv_cache(1)
            rows = []
            for t in range(tokens.shape[1]):
                position = torch.tensor([t]) if name == "fixed-shapes" else None
                rows.append(step(tokens[:, t:t + 1], t, cache.kv, position, cache.inputs)[0, 0])
            got[name] = torch.stack(rows)
    for name, logits in got.items():
        assert logits.dtype == torch.float32
        if name != "python":
            torch.testing.assert_close(logits, got["python"], rtol=1e-3, atol=1e-3, msg=name)
        # bfloat16 keeps about 3 significant digits: the logits stay near float32's, and so does the choice.
        assert (logits - want).abs().max() < 0.05 * want.abs().max() + 0.02, name
        assert (logits.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75, name


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_sampled_rows_match_without_the_cache_and_differ_from_each_other(penalty):
    """Three samples drawn together at temperature 1 (with and without a repetition penalty, which
    makes the cached path keep its window): the same draws as the uncached path across window
    slides, and the rows go their own ways."""
    model = Decoder(small_model(pos_encoding="rope"), torch.float32)
    reference = small_model(pos_encoding="rope")
    settings = SamplingSettings(temperature=1.0, repetition_penalty=penalty)

    def sample(m, use_cache):
        generator = torch.Generator().manual_seed(3)
        return list(generate(m, [1, 2, 3], 30, settings, generator, num_samples=3, use_cache=use_cache))

    cached, uncached = sample(model, True), sample(reference, False)
    assert len(cached) == len(uncached) == 30
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.tokens, b.tokens)
    rows = torch.stack([s.tokens for s in cached], dim=1)  # (3, 30)
    assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[1], rows[2])

# -- the pure sampling function on hand-made logits -------------------------------------------

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])


def draws(settings: SamplingSettings, n: int = 4000, history=None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    logits = LOGITS.expand(n, -1)
    hist = None if history is None else torch.tensor(history).expand(n, -1)
    return torch.bincount(next_token(logits, settings, generator, hist), minlength=5).float() / n


def test_temperature_zero_and_top_k_one_and_tiny_top_p_are_greedy():
    for settings in (SamplingSettings(temperature=0.0), SamplingSettings(temperature=1.0, top_k=1),
                     SamplingSettings(temperature=1.0, top_p=1e-6)):
        assert draws(settings)[0] == 1.0


def test_same_seed_same_draws_different_seed_different_draws():
    logits = torch.zeros(1, 50)
    s = SamplingSettings(temperature=1.0)
    pick = lambda seed: [next_token(logits, s, torch.Generator().manual_seed(seed)).item() for _ in range(1)]
    gen_a, gen_b, gen_c = (torch.Generator().manual_seed(x) for x in (1, 1, 2))
    a = [next_token(logits, s, gen_a).item() for _ in range(20)]
    b = [next_token(logits, s, gen_b).item() for _ in range(20)]
    c = [next_token(logits, s, gen_c).item() for _ in range(20)]
    assert a == b and a != c
    assert pick(3) == pick(3)


def test_top_k_keeps_only_the_k_most_likely():
    freq = draws(SamplingSettings(temperature=1.0, top_k=2))
    assert freq[2:].sum() == 0 and freq[0] > freq[1] > 0


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS, -1)[0]  # 0.61, 0.22, 0.14, 0.03, 0.004
    freq = draws(SamplingSettings(temperature=1.0, top_p=0.7))
    assert probs[0] < 0.7 <= probs[:2].sum()
    assert freq[2:].sum() == 0 and freq[1] > 0


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.softmax(LOGITS, -1)[0]
    freq = draws(SamplingSettings(temperature=1.0, min_p=0.2))
    kept = probs >= 0.2 * probs[0]
    assert kept.tolist() == [True, True, True, False, False]
    assert freq[~kept].sum() == 0
    expected = probs * kept / (probs * kept).sum()
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    out = apply_repetition_penalty(LOGITS.clone(), torch.tensor([[0, 3, 3]]), 2.0)
    assert out.tolist() == [[1.0, 1.0, 0.5, -2.0, -3.0]]
    # Seen tokens become rarer, the others more common.
    before, after = draws(SamplingSettings(temperature=1.0)), draws(
        SamplingSettings(temperature=1.0, repetition_penalty=2.0), history=[[0]])
    assert after[0] < before[0] and after[1] > before[1]


def test_stop_sequence_ends_generation_where_it_first_appears():
    model = small_model()
    greedy = SamplingSettings(temperature=0.0)
    tokens = [s.tokens.item() for s in generate(model, [1], 12, greedy)]
    stop = tokens[3:5]
    first_end = next(i + 2 for i in range(len(tokens) - 1) if tokens[i:i + 2] == stop)
    steps = list(generate(model, [1], 12, greedy, stop=[stop]))
    assert len(steps) == first_end
    assert [s.tokens.item() for s in steps] == tokens[:first_end]
    assert all(s.active.item() for s in steps)  # the token completing the stop text still belongs to the sample


# -- the command --------------------------------------------------------------------------------

def test_greedy_text_is_the_same_with_and_without_the_cache(run_copy):
    with_cache = invoke("sample", run_copy, "--prompt", "ROMEO:", "--temperature", "0", "-n", "60", "--json")
    without = invoke("sample", run_copy, "--prompt", "ROMEO:", "--temperature", "0", "-n", "60", "--json",
                     "--no-kv-cache")
    assert with_cache.exit_code == 0 and without.exit_code == 0
    assert with_cache.json()["samples"] == without.json()["samples"]
    assert len(with_cache.json()["samples"][0]) == 60


def test_json_reports_samples_speed_seed_and_settings(run_copy):
    result = invoke("sample", run_copy, "-p", "ROMEO:", "-n", "25", "--num-samples", "3", "--seed", "7",
                    "--top-k", "1000", "--json")
    assert result.exit_code == 0, result.stderr
    data = result.json()
    assert data["prompt"] == "ROMEO:" and data["seed"] == 7
    assert len(data["samples"]) == 3 and all(len(s) == 25 for s in data["samples"])
    assert data["tokens_generated"] == 75 and data["tokens_per_second"] > 0
    assert data["settings"]["top_k"] <= 65  # clamped to the vocabulary
    again = invoke("sample", run_copy, "-p", "ROMEO:", "-n", "25", "--num-samples", "3", "--seed", "7", "--json")
    other = invoke("sample", run_copy, "-p", "ROMEO:", "-n", "25", "--num-samples", "3", "--seed", "8", "--json")
    assert again.json()["samples"] == data["samples"]
    assert other.json()["samples"] != data["samples"]


def test_generation_runs_past_block_size(run_copy):
    result = invoke("sample", run_copy, "-n", "100", "--seed", "1", "--json")
    assert result.exit_code == 0
    assert len(result.json()["samples"][0]) == 100  # block_size is 16 in the test run


def test_stop_text_ends_the_sample_and_is_not_printed(run_copy):
    result = invoke("sample", run_copy, "-p", "ROMEO:", "-n", "300", "--seed", "1", "--stop", "\n", "--json")
    sample = result.json()["samples"][0]
    assert "\n" not in sample and len(sample) < 300


def test_prompt_checks(run_copy):
    assert_usage_error(invoke("sample", run_copy, "--prompt", "héllo€"), "'é'", "'€'")
    skipped = invoke("sample", run_copy, "--prompt", "héllo€", "--unknown", "skip", "-n", "5", "--json")
    assert skipped.exit_code == 0 and skipped.json()["prompt"] == "hllo"  # what the model was given
    shown = invoke("sample", run_copy, "--prompt", "héllo€", "--unknown", "skip", "-n", "5", "--no-stream")
    assert shown.exit_code == 0 and shown.stdout.startswith("hllo") and "€" not in shown.stdout
    empty = invoke("sample", run_copy, "--prompt", "", "-n", "5", "--json")
    assert empty.exit_code == 0
    piped = invoke("sample", run_copy, "--prompt", "-", "-n", "5", "--json", input="JULIET:")
    assert piped.json()["prompt"] == "JULIET:"


@pytest.mark.parametrize("flag,value,allowed", [
    ("--temperature", "-1", "0 (greedy) or positive"), ("--top-p", "0", "(0, 1]"), ("--top-p", "1.5", "(0, 1]"),
    ("--top-k", "0", "at least 1"), ("--min-p", "2", "[0, 1]"), ("--repetition-penalty", "0", "[0.01, 100]"), ("--temperature", "inf", "finite"),
    ("--dtype", "float16", "GPU"), ("--dtype", "int3", "float32, bfloat16 or float16")])
def test_out_of_range_settings_exit_2_with_the_allowed_range(run_copy, flag, value, allowed):
    assert_usage_error(invoke("sample", run_copy, flag, value), flag if flag != "--dtype" else "dtype", allowed)


def test_output_piped_into_head_ends_quietly(run_copy):
    shell = " ".join(f"'{a}'" for a in cli_command("sample", str(run_copy), "-n", "3000", "--seed", "1"))
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {shell} | head -c 100"], capture_output=True,
                          text=True, env=cli_env(), timeout=120)
    assert len(proc.stdout) == 100
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 0  # a closed pipe is the reader being done, not a failure


def test_several_samples_are_separated_by_a_line_a_shell_can_split_on(run_copy):
    result = invoke("sample", run_copy, "-p", "A", "-n", "10", "--num-samples", "3", "--seed", "2", "--no-stream")
    assert result.exit_code == 0
    assert result.stdout.count("\n-----\n") == 2
    assert math.isclose(len(result.stdout.split("\n-----\n")), 3)


def test_compile_needs_the_kv_cache(run_copy):
    assert_usage_error(invoke("sample", run_copy, "--compile", "--no-kv-cache"), "--compile", "--no-kv-cache")


# ---------------------------------------------------------------------------------------------
# generate(top=K): what the model weighed, from the distribution the token was drawn from
# ---------------------------------------------------------------------------------------------

WEIGHED_SETTINGS = [SamplingSettings(temperature=0.9), SamplingSettings(temperature=1.3, top_k=5),
                    SamplingSettings(temperature=0.7, top_p=0.8, min_p=0.05),
                    SamplingSettings(temperature=1.0, repetition_penalty=1.5)]


@pytest.mark.parametrize("settings", WEIGHED_SETTINGS, ids=str)
def test_the_top_list_is_the_distribution_the_token_was_drawn_from(settings):
    from minigpt_cli.sampler import sampling_probs

    model = small_model()
    steps = list(generate(model, [1, 2, 3], 25, settings, torch.Generator().manual_seed(3), num_samples=2, top=4))
    history = torch.tensor([[1, 2, 3]] * 2)
    for step in steps:
        w = step.weighing
        # The distribution again, from the step's logits: what the sampler drew from, rescaled to sum to 1.
        probs = sampling_probs(step.logits, settings, history)
        probs = probs / probs.sum(-1, keepdim=True)
        assert w.probs.shape == w.ids.shape == (2, 4)
        assert (w.probs[:, :-1] >= w.probs[:, 1:]).all() and (w.probs <= 1).all() and (w.probs >= 0).all()
        assert (w.probs.sum(-1) <= 1 + 1e-6).all()
        torch.testing.assert_close(w.probs, probs.gather(1, w.ids))
        torch.testing.assert_close(w.chosen, probs.gather(1, step.tokens[:, None]).squeeze(1))
        assert (w.chosen > 0).all()  # a token the filters removed is never drawn
        history = torch.cat([history, step.tokens[:, None]], dim=1)
        if history.shape[1] > model.config.block_size:  # the window slides as generate's does
            history = history[:, -slide_keep(model.config.block_size):]


def test_the_whole_vocabulary_weighed_sums_to_one_and_greedy_draws_the_top_with_probability_one():
    model = small_model()
    for step in generate(model, [4, 5], 20, SamplingSettings(temperature=0.8), torch.Generator().manual_seed(0),
                         top=VOCAB):
        assert step.weighing.probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    for step in generate(model, [4, 5], 20, SamplingSettings(temperature=0.0), top=3):
        assert torch.equal(step.tokens, step.weighing.ids[:, 0])
        assert step.weighing.chosen.tolist() == [1.0] and step.weighing.probs[0, 0].item() == 1.0
        assert step.weighing.probs[0, 1:].sum().item() == 0.0


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("settings", [*WEIGHED_SETTINGS, SamplingSettings(temperature=0.0)], ids=str)
def test_weighing_draws_the_same_tokens_as_plain_sampling(settings, use_cache):
    model = small_model()

    def tokens(top: int) -> list[list[int]]:
        return [s.tokens.tolist() for s in generate(model, [1, 2], 30, settings, torch.Generator().manual_seed(7),
                                                     num_samples=3, use_cache=use_cache, top=top)]

    assert tokens(0) == tokens(5)


def test_plain_generation_weighs_nothing():
    steps = list(generate(small_model(), [1], 3, SamplingSettings(), torch.Generator().manual_seed(0)))
    assert all(s.weighing is None for s in steps)


def test_the_settings_name_what_shapes_the_distribution():
    assert SamplingSettings(temperature=0.8).applied() == (
        ["temperature 0.8"], ["top-k", "top-p", "min-p", "repetition penalty"])
    assert SamplingSettings(temperature=0.0, top_k=5, repetition_penalty=1.2).applied() == (
        ["temperature 0 = greedy", "top-k 5", "repetition penalty 1.2"], ["top-p", "min-p"])
