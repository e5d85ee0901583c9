"""eval, bench and inspect: exit codes, JSON keys, and values checked against what they must equal."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path

import pytest

from conftest import (BUNDLED_TEXT, assert_fits_80, assert_usage_error, invoke, train_in_process,
                      write_small_corpus)

BLOCK_SIZE = 16
MAX_ITERS = 30


@pytest.fixture(scope="module")
def tiny(module_dir: Path):
    """A tiny run on a small corpus, with sampled evaluations at steps 10 and 20 and a full one at 30."""
    corpus = write_small_corpus(module_dir / "small.txt")
    run_dir = module_dir / "runs" / "tiny"
    result = train_in_process([f"data.path={corpus}", f"train.max_iters={MAX_ITERS}", "train.eval_interval=10",
                               "train.eval_iters=2", "train.batch_size=8", f"model.block_size={BLOCK_SIZE}",
                               "train.log_interval=2"], run_dir)
    return {"run": run_dir, "result": result, "corpus": corpus}


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------

def test_eval_equals_the_training_loops_own_val_loss(tiny):
    # The loop's final loss scores the whole validation split in non-overlapping block_size windows.
    got = invoke("eval", tiny["run"], "--checkpoint", "latest", "--stride", BLOCK_SIZE, "--json")
    assert got.exit_code == 0, got.stderr
    assert len(got.stdout.strip().splitlines()) == 1
    data = got.json()
    result = tiny["result"]
    assert data["nll"] == pytest.approx(result.final_val_loss, rel=1e-6)
    assert data["chars_scored"] == result.val_tokens_scored
    assert data["bpc"] == pytest.approx(data["nll"] / math.log(2))
    assert data["perplexity"] == pytest.approx(math.exp(data["nll"]))
    assert data["checkpoint_val_loss"] == pytest.approx(result.final_val_loss, rel=1e-6)
    assert data["stride"] == BLOCK_SIZE and data["min_context"] == 0
    assert "validation split" in data["source"]


def test_eval_default_is_a_strided_window_over_the_validation_split(tiny):
    got = invoke("eval", tiny["run"], "--json")
    assert got.exit_code == 0, got.stderr
    data = got.json()
    assert data["stride"] == BLOCK_SIZE // 2
    assert data["min_context"] == BLOCK_SIZE - BLOCK_SIZE // 2
    assert data["chars_scored"] == tiny["result"].val_tokens_scored  # every character once, however strided
    assert 0 < data["nll"] < math.log(65) + 0.5
    human = invoke("eval", tiny["run"])
    assert human.exit_code == 0
    assert "bits per character" in human.stdout and f"every {BLOCK_SIZE // 2} characters" in human.stdout


def test_eval_reads_a_file_or_stdin(tiny, tmp_path: Path):
    text = BUNDLED_TEXT.read_text(encoding="utf-8")[50_000:53_000]
    path = tmp_path / "other.txt"
    path.write_text(text, encoding="utf-8")
    from_file = invoke("eval", tiny["run"], "--data", path, "--json")
    from_stdin = invoke("eval", tiny["run"], "--data", "-", "--json", input=text)
    assert from_file.exit_code == 0 and from_stdin.exit_code == 0, from_file.stderr + from_stdin.stderr
    assert from_file.json()["chars_scored"] == len(text) - 1
    assert from_file.json()["nll"] == pytest.approx(from_stdin.json()["nll"], rel=1e-9)


def test_eval_of_a_long_text_scores_a_stated_fixed_sample_unless_told_to_score_all(tiny):
    whole = invoke("eval", tiny["run"], "--json").json()
    assert not whole["sampled"] and whole["max_chars"] == 2_000_000  # the split is small: all of it
    first = invoke("eval", tiny["run"], "--max-chars", "200", "--json").json()
    again = invoke("eval", tiny["run"], "--max-chars", "200", "--json").json()
    assert first["sampled"] and first["chars_scored"] == 200 < whole["chars_scored"]
    assert first["nll"] == again["nll"]  # the same windows every time
    assert invoke("eval", tiny["run"], "--max-chars", "0", "--json").json()["nll"] == whole["nll"]
    human = invoke("eval", tiny["run"], "--max-chars", "200")
    assert f"200 sampled of {whole['text_chars']:,}" in human.stdout


def test_eval_reports_progress_and_ctrl_c_exits_130_with_one_line(tiny, monkeypatch: pytest.MonkeyPatch):
    from minigpt_cli import views
    from minigpt_cli.evaluate import EvalRequest, evaluate

    seen = []
    result = evaluate(EvalRequest(run=tiny["run"], batch_size=4, progress=seen.append))
    assert seen[-1].finished and seen[-1].done == seen[-1].total == result.chars_scored
    assert [p.done for p in seen] == sorted(p.done for p in seen)

    def interrupt(self, progress) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(views.ProgressView, "__call__", interrupt)
    got = invoke("eval", tiny["run"])
    assert got.exit_code == 130 and got.error_lines == ["interrupted"] and not got.stdout


def test_eval_names_characters_outside_the_vocabulary(tiny, tmp_path: Path):
    path = tmp_path / "odd.txt"
    path.write_text("To be, or not to be: ☃ é\n", encoding="utf-8")
    got = invoke("eval", tiny["run"], "--data", path)
    assert_usage_error(got, "'é'", "'☃'", "not in the model's vocabulary")


def test_eval_bad_input_exits_2(tiny, tmp_path: Path):
    assert_usage_error(invoke("eval", tiny["run"], "--stride", 0), "--stride")
    assert_usage_error(invoke("eval", tiny["run"], "--stride", BLOCK_SIZE + 1), "--stride")
    assert_usage_error(invoke("eval", tmp_path / "nowhere"), "not found")
    assert_usage_error(invoke("eval", tiny["run"], "--data", tmp_path / "missing.txt"), "missing.txt")


def _hand_built_run(run_dir: Path, text: str, probs) -> None:
    """A GPT whose every prediction is `probs`: blocks are the identity (output projections zero),
    every token embeds to the same vector, and the head's rows are log(probs)."""
    import torch

    from minigpt_cli.checkpoint import save_checkpoint
    from minigpt_cli.config import apply_overrides, load_config
    from minigpt_cli.model import GPT
    from minigpt_cli.tokenizer import CharTokenizer

    config = apply_overrides(load_config("tiny"), [f"model.block_size={BLOCK_SIZE}", "model.norm_placement=pre",
                                                   "model.logit_softcap=0", "model.tie_weights=false"])
    tokenizer = CharTokenizer.from_text(text)
    model = GPT(config.model, tokenizer.vocab_size)
    C = config.model.n_embd
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        model.wte.weight.fill_(1.0)
        # rms_norm(ones) is ones / sqrt(1 + eps); this gain makes it exactly ones.
        model.norm_f.weight.fill_(math.sqrt(1.0 + model.norm_f.eps))
        model.lm_head.weight.copy_(torch.log(probs)[:, None].expand(-1, C) / C)  # logits = log(probs)
    save_checkpoint(run_dir, model, config, tokenizer, {"step": 0}, {}, {}, is_best=True)


def test_eval_nll_equals_the_exact_value_of_a_hand_built_model(tmp_path: Path):
    import torch

    from minigpt_cli.tokenizer import CharTokenizer

    text = "abracadabra, a cab; a bad baccarat.\n" * 5
    tokenizer = CharTokenizer.from_text(text)
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(tokenizer.vocab_size, generator=generator, dtype=torch.float64), 0)
    _hand_built_run(tmp_path / "hand", text, probs.float())
    data_path = tmp_path / "text.txt"
    data_path.write_text(text, encoding="utf-8")
    targets = torch.tensor(tokenizer.encode(text[1:]))
    exact = -torch.log(probs)[targets].mean().item()
    for stride in (BLOCK_SIZE, 5, 1):
        got = invoke("eval", tmp_path / "hand", "--data", data_path, "--stride", stride, "--json")
        assert got.exit_code == 0, got.stderr
        data = got.json()
        assert data["chars_scored"] == len(text) - 1
        assert data["nll"] == pytest.approx(exact, rel=1e-5), f"stride {stride}"
        assert data["bpc"] == pytest.approx(exact / math.log(2), rel=1e-5)


def test_a_model_that_knows_nothing_scores_log_vocab_size():
    import numpy as np
    import torch

    from minigpt_cli.config import ModelConfig
    from minigpt_cli.device import choose_precision
    from minigpt_cli.evaluate import score
    from minigpt_cli.model import GPT

    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8), vocab_size=11)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: uniform over the vocabulary
    ids = np.random.default_rng(0).integers(0, 11, size=100).astype(np.uint8)
    cpu = torch.device("cpu")
    nll, count = score(model, ids, 3, 4, cpu, choose_precision(cpu, "float32"))
    assert count == 99
    assert nll == pytest.approx(math.log(11), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------

def _walk(node: dict, factor: int = 1):
    yield node, factor
    for child in node["children"]:
        yield from _walk(child, factor * child["repeat"])


def test_inspect_run_json(tiny):
    import torch

    from minigpt_cli.checkpoint import load_checkpoint

    got = invoke("inspect", tiny["run"], "--json")
    assert got.exit_code == 0, got.stderr
    assert len(got.stdout.strip().splitlines()) == 1
    data = got.json()
    loaded = load_checkpoint(tiny["run"], which="latest")
    m = loaded.config.model
    V = loaded.tokenizer.vocab_size
    params = data["params"]

    # Parameter counts: the checkpoint's tensors, the top-level modules, and every node of the tree agree.
    assert params["total"] == sum(t.numel() for t in loaded.model_state.values())
    assert params["total"] == sum(params["by_module"].values())
    assert sum(node["own_params"] * factor for node, factor in _walk(params["tree"])) == params["total"]
    for node, _ in _walk(params["tree"]):
        assert node["params"] == node["own_params"] + sum(c["params"] * c["repeat"] for c in node["children"])
    assert params["per_layer"] * m.n_layer == params["by_module"]["blocks"]

    # FLOPs per token: within a few percent of PaLM's 6N + 12 x n_layer x T x n_embd, and exactly what
    # torch's own counter counts (this model has no short convolutions, whose backward it overcounts).
    flops = data["flops_per_token"]
    n_non_embedding = params["total"] - params["embedding"] + (V * m.n_embd if m.tie_weights else 0)
    attention = 12 * m.n_layer * m.block_size * m.n_embd  # training, every key for every query
    assert flops["train"] == pytest.approx(6 * n_non_embedding + attention, rel=0.03)
    assert flops["train"] == pytest.approx(3 * flops["forward"])
    assert flops["counted"]["forward"] == pytest.approx(flops["forward"], rel=1e-6)
    assert flops["counted"]["train"] == pytest.approx(flops["train"], rel=1e-6)
    assert data["flops_convention"] == flops["convention"] and "PaLM" in flops["convention"]

    kv = data["kv_cache"]
    assert kv["bytes_per_token"] == 2 * m.n_layer * m.n_embd * 4
    assert kv["bytes_at_block_size"] == kv["bytes_per_token"] * m.block_size
    B, T, H = loaded.config.train.batch_size, m.block_size, m.n_head
    shapes = {(row["stage"], row["symbols"]): row["shape"] for row in data["shapes"]}
    assert shapes[("training", "(B, T, C)")] == [B, T, m.n_embd]
    assert shapes[("training", "(B, n_head, T, T)")] == [B, H, T, T]
    assert shapes[("training", "(B, T, vocab_size)")] == [B, T, V]
    assert shapes[("decoding", "(B, 1, vocab_size)")] == [B, 1, V]

    run = data["run"]
    assert run["steps"] == MAX_ITERS
    assert run["tokens_seen"] == tiny["result"].tokens
    assert run["vocab"]["size"] == V and "\\n" in run["vocab"]["chars"]
    assert run["best_val_loss"] == pytest.approx(tiny["result"].best_val_loss)
    assert run["best_val_bpc"] == pytest.approx(run["best_val_loss"] / math.log(2))
    assert run["data_fingerprint"] == hashlib.sha256(tiny["corpus"].read_bytes()).hexdigest()
    assert run["torch_version"] == torch.__version__
    assert [step for step, _ in run["curves"]["train"]] == list(range(2, MAX_ITERS + 1, 2))
    assert [step for step, _ in run["curves"]["val"]] == [10, 20, 30]


def test_inspect_for_people_draws_the_tree_and_the_loss_curve(tiny):
    got = invoke("inspect", tiny["run"])
    assert got.exit_code == 0, got.stderr
    for fragment in ("lm_head", "(x2)", "(B, T, vocab_size)", "(B, 1, vocab_size)", "loss against step",
                     "o val", ". train", "bits per character"):
        assert fragment in got.stdout, fragment


GPT2 = {"gpt2_small": (12, 768), "gpt2_medium": (24, 1024), "gpt2_large": (36, 1280), "gpt2_xl": (48, 1600)}


def test_inspect_gpt2_configs_count_what_the_closed_form_says():
    previous = None
    for name, (L, C) in GPT2.items():
        got = invoke("inspect", name, "--json")
        assert got.exit_code == 0, got.stderr
        data = got.json()
        V = data["target"]["vocab_size"]
        assert V == 65
        params = data["params"]
        # Per layer: 12 C^2 weights plus 13 C of biases and layernorm; a final layernorm; tied head.
        assert params["total"] == L * (12 * C * C + 13 * C) + 2 * C + V * C + 1024 * C
        assert params["non_embedding"] == pytest.approx(12 * L * C * C, rel=0.002)
        assert params["by_module"]["lm_head"] == 0  # tied to wte
        now = (params["total"], data["flops_per_token"]["train"], data["kv_cache"]["bytes_per_token"])
        if previous:
            assert all(a > b for a, b in zip(now, previous)), name
        previous = now
    assert previous[0] > 1.4e9  # XL


def test_inspect_plot_needs_matplotlib_and_a_run(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert_usage_error(invoke("inspect", "tiny", "--plot", tmp_path / "x.png"), "--plot", "run")
    assert_usage_error(invoke("inspect", tiny["run"], "--plot", tmp_path / "x.txt"), ".png")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)
        patch.setitem(sys.modules, "matplotlib.figure", None)
        assert_usage_error(invoke("inspect", tiny["run"], "--plot", tmp_path / "x.png"), "matplotlib", "pip install")


def test_inspect_plot_writes_an_image(tiny, tmp_path: Path):
    pytest.importorskip("matplotlib")
    png, svg = tmp_path / "curves.png", tmp_path / "curves.svg"
    assert invoke("inspect", tiny["run"], "--plot", png, "--json").exit_code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert invoke("inspect", tiny["run"], "--plot", svg).exit_code == 0
    assert b"<svg" in svg.read_bytes()[:2000]


def test_inspect_errors_exit_2(tmp_path: Path):
    assert_usage_error(invoke("inspect", "no_such_config"), "no_such_config")
    assert_usage_error(invoke("inspect", tmp_path / "nowhere" / "run"), "no such run directory or config")
    assert_usage_error(invoke("inspect", "tiny", "--set", "model.n_layers=3"), "n_layers")


def test_text_chart_places_both_series():
    from minigpt_cli.inspection import text_chart

    lines = text_chart({"train": [[0, 4.0], [10, 3.0], [20, 2.0]], "val": [[20, 2.5]]}, width=20, height=5)
    assert lines[0].startswith("4.000") and lines[0].rstrip().endswith("|.")
    assert lines[4].startswith("2.000") and lines[4].rstrip().endswith(".")
    assert any(line.rstrip().endswith("o") for line in lines)
    assert text_chart({"train": [], "val": []}) == ["(no losses recorded yet)"]


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------

def _positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and v > 0 and math.isfinite(v) for v in values)


def test_bench_json_on_a_run(tiny):
    import torch

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    got = invoke("bench", tiny["run"], "--quick", "--max-seq", 128, "--batch-sizes", "1,2", "--repeats", 2,
                 "--json")
    assert got.exit_code == 0, got.stderr
    assert torch.equal(torch.get_rng_state(), state), "bench changed the global random state"
    assert len(got.stdout.strip().splitlines()) == 1
    data = got.json()
    assert data["target"]["kind"] == "run" and data["device"] == "cpu"
    assert data["model"]["n_params"] == tiny["result"].n_params

    train = data["train"]
    assert train["batch_size"] == 8 and train["seq_len"] == BLOCK_SIZE
    assert _positive(train["ms_per_iter"]["median_ms"], train["tokens_per_sec"], train["achieved_gflops"])
    assert train["tokens_per_sec"] == pytest.approx(8 * BLOCK_SIZE / (train["ms_per_iter"]["median_ms"] / 1e3))
    assert train["mfu"] is None  # no published CPU peak

    sample = data["sample"]
    assert _positive(sample["time_to_first_token_ms"]["median_ms"], sample["prefill_tokens_per_sec"],
                     sample["weight_floor"]["ms"], sample["floor_pct"])
    # Past block_size (16) up to --max-seq: where the uncached step's quadratic attention shows.
    assert [row["context"] for row in sample["decode"]] == [2, 8, 15, 31, 63, 127]
    assert [row["past_block_size"] for row in sample["decode"]] == [False] * 3 + [True] * 3
    assert "block_size 16" in sample["past_block_size"]
    assert "linearly" in sample["cost"] and "quadratically" in sample["cost"]
    for row in sample["decode"]:
        # Without the cache a step computes every one of the L + 1 positions the cached step computes once.
        assert row["uncached_flops"] == (row["context"] + 1) * row["cached_flops"]
    for row in sample["decode"]:
        assert _positive(row["cached_tokens_per_sec"], row["uncached_tokens_per_sec"], row["floor_pct"])
    m = data["model"]
    weights = 4 * (m["n_layer"] * 12 * m["n_embd"] ** 2 + m["n_embd"] * m["vocab_size"])
    assert sample["weight_floor"]["bytes"] == weights
    assert [row["batch_size"] for row in sample["batch"]] == [1, 2]

    attention = data["attention"]
    rows = {row["seq_len"]: row for row in attention["rows"]}
    assert sorted(rows) == [64, 128]
    for row in rows.values():
        assert _positive(row["plain_ms"]["median_ms"], row["sdpa_ms"]["median_ms"], row["plain_peak_bytes"])
    # The written-out scores are (B, n_head, T, T): twice the length, four times the memory.
    assert rows[128]["plain_peak_bytes"] / rows[64]["plain_peak_bytes"] == pytest.approx(4, rel=0.35)
    assert rows[128]["sdpa_peak_bytes"] < rows[128]["plain_peak_bytes"] / 4
    assert data["memory"]["peak_bytes"] > 0


def test_bench_leaves_the_random_state_as_it_was():
    import torch

    from minigpt_cli.bench import BenchOptions, bench
    from minigpt_cli.targets import resolve_target

    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    messages = []
    result = bench(resolve_target("tiny", ["model.block_size=16"]),
                   BenchOptions(quick=True, repeats=1, warmup=0, max_seq=64, batch_sizes=[1], sections=["sample"]),
                   progress=messages.append)
    assert torch.equal(torch.rand(4), expected)
    assert messages and all(isinstance(m, str) for m in messages)
    assert set(result) >= {"target", "model", "sample", "memory", "notes"} and "train" not in result


def test_bench_for_people_on_a_config():
    got = invoke("bench", "tiny", "--quick", "--max-seq", 64, "--batch-sizes", "1", "--repeats", 1,
                 "--set", "model.block_size=16")
    assert got.exit_code == 0, got.stderr
    for fragment in ("training", "tokens per second", "time to first token", "weight-read floor",
                     "decode step", "causal attention", "peak memory"):
        assert fragment in got.stdout, fragment
    assert "bench:" in got.stderr  # the progress line


def test_bench_errors_exit_2(tiny):
    assert_usage_error(invoke("bench", "tiny", "--only", "everything"), "everything")
    assert_usage_error(invoke("bench", "tiny", "--max-seq", 8), "--max-seq")
    assert_usage_error(invoke("bench", "tiny", "--batch-sizes", "1,x"), "--batch-sizes")
    assert_usage_error(invoke("bench", tiny["run"], "--set", "model.n_layer=3"), "--set")
    assert_usage_error(invoke("bench", "tiny", "--device", "cpu", "--dtype", "float16"), "float16")


def test_bench_samples_in_the_precision_sample_would_use():
    from minigpt_cli.bench import BenchOptions, bench
    from minigpt_cli.targets import resolve_target

    target = resolve_target("tiny", ["model.block_size=16"])
    floors = {}
    for dtype in ("float32", "bfloat16"):
        options = BenchOptions(device="cpu", quick=True, repeats=1, warmup=0, max_seq=64, batch_sizes=[1],
                               sections=["sample"], dtype=dtype)
        sample = bench(target, options)["sample"]
        assert sample["dtype"] == dtype
        floors[dtype] = sample["weight_floor"]["bytes"]
    assert floors["bfloat16"] * 2 == floors["float32"]  # weight matrices in 2 bytes instead of 4


def test_flops_per_token_is_the_standard_estimate():
    from minigpt_cli.config import ModelConfig
    from minigpt_cli.model import flops_per_token

    m = ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=128, mlp_ratio=4)
    f = flops_per_token(m, vocab_size=50)
    N = 3 * 12 * 64 * 64 + 64 * 50
    assert f["matmul_params"] == N
    assert f["forward"] == 2 * N + 4 * 3 * 128 * 64  # every key for every query: 4 x n_layer x T x n_embd
    assert f["train"] == 3 * f["forward"]
    assert json.loads(json.dumps(f)) == f
    conv = flops_per_token(dataclasses.replace(m, short_conv=4), vocab_size=50)
    assert conv["forward"] - f["forward"] == conv["short_conv_forward"] == 2 * 2 * 3 * 4 * 64


def test_the_written_out_attention_is_the_same_function_as_sdpa():
    import torch
    import torch.nn.functional as F

    from minigpt_cli.bench import written_out_attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=generator) for _ in range(3))
    visible = torch.ones(40, 40, dtype=torch.bool).tril()  # True where a query may look
    assert torch.allclose(written_out_attention(q, k, v, visible),
                          F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The lessons: where the norm sits, GPT-2's own sizes
# ---------------------------------------------------------------------------------------------

def _block_node(data: dict) -> dict:
    blocks = next(c for c in data["params"]["tree"]["children"] if c["name"] == "blocks")
    return blocks["children"][0]


def test_inspect_shows_where_the_norm_sits():
    orders = {}
    for placement in ("pre", "post"):
        got = invoke("inspect", "tiny", "--set", f"model.norm_placement={placement}", "--json")
        assert got.exit_code == 0, got.stderr
        node = _block_node(got.json())
        assert node["detail"] == f"{placement}-norm"
        orders[placement] = node["order"]
        people = invoke("inspect", "tiny", "--set", f"model.norm_placement={placement}")
        assert node["order"] in people.stdout
    assert "x + attn(norm_1(x))" in orders["pre"] and "x + mlp(norm_2(x))" in orders["pre"]
    assert "norm_1(x + attn(x))" in orders["post"] and "norm_2(x + mlp(x))" in orders["post"]


# GPT-2's published sizes (124M, 355M, 774M, 1.5B) counted exactly: 50,257 tokens, 1,024 learned
# positions, biases, LayerNorm, tied head.
GPT2_OWN_COUNTS = {"gpt2_small": 124_439_808, "gpt2_medium": 354_823_168, "gpt2_large": 774_030_080,
                   "gpt2_xl": 1_557_611_200}


def test_vocab_size_option_reproduces_gpt2s_own_parameter_counts():
    from minigpt_cli.targets import resolve_target
    from minigpt_cli.inspection import GPT2_VOCAB_SIZE, meta_model, parameter_counts

    for name, count in GPT2_OWN_COUNTS.items():
        own = resolve_target(name, vocab_size=GPT2_VOCAB_SIZE)
        assert own.vocab_size == 50257 and own.vocab_source == "--vocab-size"
        assert meta_model(own).num_parameters() == count, name
        chars = parameter_counts(meta_model(resolve_target(name)))
        assert chars["total"] < count and chars["at_gpt2_vocab"] == count
    people = invoke("inspect", "gpt2_small").stdout
    assert "85.89M parameters with this vocabulary of 65 characters" in people
    assert "124.44M" in people and "--vocab-size 50257" in people
    own = invoke("inspect", "gpt2_small", "--vocab-size", 50257)
    assert "124.44M parameters with GPT-2's own vocabulary of 50,257" in own.stdout
    assert "set by --vocab-size" in own.stdout


def test_bench_counts_with_the_vocab_size_option():
    got = invoke("bench", "tiny", "--vocab-size", 50257, "--only", "attention", "--max-seq", 64, "--quick",
                 "--repeats", 1, "--json")
    assert got.exit_code == 0, got.stderr
    model = got.json()["model"]
    assert model["vocab_size"] == 50257
    assert model["n_params"] == invoke("inspect", "tiny", "--vocab-size", 50257, "--json").json()["params"]["total"]


def test_vocab_size_option_bad_input(tiny):
    assert_usage_error(invoke("inspect", "tiny", "--vocab-size", 0), "--vocab-size", "at least 1")
    assert_usage_error(invoke("inspect", tiny["run"], "--vocab-size", 50257), "--vocab-size", "run")
    assert_usage_error(invoke("bench", tiny["run"], "--vocab-size", 50257), "--vocab-size", "run")


def test_eval_and_the_training_summary_show_the_uniform_baseline(tiny, tmp_path: Path):
    from conftest import FAST, set_flags

    from minigpt_cli.checkpoint import load_checkpoint

    V = load_checkpoint(tiny["run"]).tokenizer.vocab_size
    data = invoke("eval", tiny["run"], "--json").json()
    assert data["vocab_size"] == V
    assert data["uniform_nll"] == pytest.approx(math.log(V))
    assert data["uniform_bpc"] == pytest.approx(math.log2(V))
    assert data["bpc"] == pytest.approx(data["nll"] / math.log(2))
    assert data["nll"] < data["uniform_nll"]  # thirty steps already beat knowing nothing
    people = " ".join(invoke("eval", tiny["run"]).stdout.split())  # as one line, however the table wraps
    assert f"ln({V})" in people and "bits per character" in people and "knows nothing" in people

    flags = [*set_flags(*FAST, "train.max_iters=2", "train.eval_interval=2"), "--data", tiny["corpus"]]
    summary = invoke("train", "tiny", *flags, "--out", tmp_path / "a", "--json").json()
    assert summary["vocab_size"] == V and summary["uniform_loss"] == pytest.approx(math.log(V))
    people = invoke("train", "tiny", *flags, "--out", tmp_path / "b")
    assert people.exit_code == 0, people.stderr
    assert "uniform baseline" in people.stdout and f"ln({V})" in people.stdout and "bits/char" in people.stdout


# ---------------------------------------------------------------------------------------------
# What attention does: inspect --attention
# ---------------------------------------------------------------------------------------------

def test_attention_weights_are_the_ones_the_model_multiplies_its_values_by(tiny):
    import torch

    from minigpt_cli.checkpoint import load_checkpoint
    from minigpt_cli.inspection import attention_probabilities

    loaded = load_checkpoint(tiny["run"], which="latest")
    model = loaded.build_model("cpu").eval()
    idx = torch.tensor([loaded.tokenizer.encode("First Citizen:")])
    seen = {}
    block = model.blocks[1]
    hook = block.attn.register_forward_hook(lambda m, inputs, output: seen.update(x=inputs[0], out=output))
    try:
        maps = attention_probabilities(model, idx)
    finally:
        hook.remove()
    assert len(maps) == 2 and maps[1].shape == (2, 14, 14)
    assert torch.allclose(maps[1].sum(-1), torch.ones(2, 14))
    assert maps[1].triu(diagonal=1).abs().max() == 0  # causal: nothing from the future
    # softmax(QK^T/sqrt(d)) V through c_proj is the attention module's own output.
    attn, (B, T, C) = block.attn, seen["x"].shape
    v = attn.c_attn(seen["x"]).split(C, dim=2)[2].view(B, T, 2, C // 2).transpose(1, 2)  # (B, n_head, T, head_dim)
    y = (maps[1][None] @ v).transpose(1, 2).reshape(B, T, C)
    assert torch.allclose(attn.c_proj(y), seen["out"], atol=1e-5)


def test_inspect_attention_json_and_heat_map(tiny):
    got = invoke("inspect", tiny["run"], "--attention", "To be, or not", "--json")
    assert got.exit_code == 0, got.stderr
    data = got.json()
    assert data["chars"] == list("To be, or not") and data["n_layer"] == 2 and data["n_head"] == 2
    for layer in data["layers"]:
        for head in layer["heads"]:
            assert [len(row) for row in head["weights"]] == list(range(1, 14))  # row i reads positions 0..i
            assert all(abs(sum(row) - 1) < 1e-3 for row in head["weights"])
            assert 0 <= head["offsets"]["-1"] <= 1 and head["max"] >= 1 / 13
    people = invoke("inspect", tiny["run"], "--attention", "To be, or not")
    assert people.exit_code == 0, people.stderr
    for fragment in ("layer 1", "head 1", "To␣be,␣or␣not", "previous", "█"):
        assert fragment in people.stdout, fragment


def test_inspect_attention_bad_input_exits_2(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run = tiny["run"]
    assert_usage_error(invoke("inspect", run, "--attention", ""), "--attention", "at least one character")
    assert_usage_error(invoke("inspect", run, "--attention", "Zebra ☃"), "vocabulary", "☃")
    assert_usage_error(invoke("inspect", run, "--attention", "x" * (BLOCK_SIZE + 1)), "17 characters",
                       f"block_size ({BLOCK_SIZE})")
    assert_usage_error(invoke("inspect", "tiny", "--attention", "To be"), "trained run")
    assert_usage_error(invoke("inspect", run, "--attention", "To be", "--plot", tmp_path / "a.txt"), ".png")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)
        patch.setitem(sys.modules, "matplotlib.figure", None)
        assert_usage_error(invoke("inspect", run, "--attention", "To be", "--plot", tmp_path / "a.png"),
                           "matplotlib", "pip install")


def test_inspect_attention_plot_writes_an_image(tiny, tmp_path: Path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "attention.png"
    got = invoke("inspect", tiny["run"], "--attention", "To be", "--plot", png, "--json")
    assert got.exit_code == 0, got.stderr
    assert got.json()["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# What the model finds hard: eval --show
# ---------------------------------------------------------------------------------------------

def test_eval_show_gives_each_characters_surprisal(tiny, tmp_path: Path):
    text = BUNDLED_TEXT.read_text(encoding="utf-8")[:2 * BLOCK_SIZE + 1]  # exactly two windows
    path = tmp_path / "short.txt"
    path.write_text(text, encoding="utf-8")
    got = invoke("eval", tiny["run"], "--data", path, "--show", "--json")
    assert got.exit_code == 0, got.stderr
    data = got.json()
    chars = data["chars"]
    assert "".join(c["char"] for c in chars) == text and data["shown_chars"] == len(text)
    assert chars[0]["bits"] is None and chars[0]["context"] == 0
    # Windows of block_size as training sees them: context restarts at 1 at each window's start.
    assert [c["context"] for c in chars[1:]] == [*range(1, BLOCK_SIZE + 1)] * 2
    # The same windows as eval with a stride of block_size: the mean is eval's NLL in bits.
    nll = invoke("eval", tiny["run"], "--data", path, "--stride", BLOCK_SIZE, "--json").json()["nll"]
    assert data["mean_bits"] == pytest.approx(nll / math.log(2), rel=1e-4)
    assert data["uniform_bits"] == pytest.approx(math.log2(data["vocab_size"]))
    people = invoke("eval", tiny["run"], "--data", path, "--show")
    assert people.exit_code == 0, people.stderr
    for fragment in ("surprisal", "bits", "hardest", "a uniform guess", "First"):
        assert fragment in people.stdout, fragment


def test_eval_show_bad_input_exits_2(tiny, tmp_path: Path):
    assert_usage_error(invoke("eval", tiny["run"], "--show", "--stride", 4), "--stride", "--show")
    (tmp_path / "one.txt").write_text("F", encoding="utf-8")
    assert_usage_error(invoke("eval", tiny["run"], "--show", "--data", tmp_path / "one.txt"), "at least 2")
    (tmp_path / "odd.txt").write_text("Fé☃", encoding="utf-8")
    assert invoke("eval", tiny["run"], "--show", "--data", tmp_path / "odd.txt").exit_code == 2


def test_eval_show_sums_surprisal_up_by_class_of_character(tiny, tmp_path: Path):
    # Characters of the run's vocabulary (the small corpus has no digits or tabs).
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak!\n"
    path = tmp_path / "mixed.txt"
    path.write_text(text * 3, encoding="utf-8")
    data = invoke("eval", tiny["run"], "--data", path, "--show", "--json").json()
    classes = {c["class"]: c for c in data["classes"]}
    assert list(classes) == ["letters", "capitals", "digits", "punctuation", "spaces", "newlines", "other"]
    scored = [c for c in data["chars"] if c["bits"] is not None]
    # Every scored character in exactly one class; the first (unscored) one in none.
    assert sum(c["chars"] for c in classes.values()) == len(scored) == len(text) * 3 - 1
    assert classes["newlines"]["chars"] == sum(c["char"] == "\n" for c in scored)
    assert classes["spaces"]["chars"] == sum(c["char"] == " " for c in scored)
    assert classes["digits"]["chars"] == 0 and classes["other"]["chars"] == 0
    assert classes["other"]["mean_bits"] is None and classes["other"]["share_chars"] == 0.0
    # The shares add up, and the mean weighted by characters is the overall mean.
    used = [c for c in classes.values() if c["chars"]]
    assert sum(c["share_bits"] for c in used) == pytest.approx(1.0, abs=1e-12)
    assert sum(c["share_chars"] for c in used) == pytest.approx(1.0, abs=1e-12)
    assert sum(c["chars"] * c["mean_bits"] for c in used) / len(scored) == pytest.approx(data["mean_bits"], rel=1e-12)
    members = {"letters": str.islower, "capitals": str.isupper, "newlines": lambda ch: ch == "\n",
               "spaces": lambda ch: ch == " ", "punctuation": lambda ch: ch in ":,.!"}
    for c in used:
        mine = [s["bits"] for s in scored if members[c["class"]](s["char"])]
        assert c["mean_bits"] == pytest.approx(sum(mine) / len(mine), rel=1e-12), c["class"]
    people = invoke("eval", tiny["run"], "--data", path, "--show")
    assert people.exit_code == 0, people.stderr
    for fragment in ("by class of character", "capitals", "punctuation", "% of all bits", "100.0%"):
        assert fragment in people.stdout, fragment


def test_char_class_names_one_class_for_each_kind_of_character():
    from minigpt_cli.evaluate import char_class

    expected = {"a": "letters", "é": "letters", "Q": "capitals", "É": "capitals", "7": "digits", ",": "punctuation",
                "$": "punctuation", "—": "punctuation", " ": "spaces", "\t": "spaces", "\n": "newlines",
                "中": "other", "\x1b": "other"}
    assert {c: char_class(c) for c in expected} == expected


def test_eval_show_limit_reads_more_or_all_of_the_text(tiny, tmp_path: Path):
    text = BUNDLED_TEXT.read_text(encoding="utf-8")[:2500]
    path = tmp_path / "longer.txt"
    path.write_text(text, encoding="utf-8")
    default = invoke("eval", tiny["run"], "--data", path, "--show", "--json").json()
    assert default["shown_chars"] == 1000 and default["limit"] == 1000 and default["text_chars"] == 2500
    more = invoke("eval", tiny["run"], "--data", path, "--show", "--limit", 1800, "--json").json()
    assert "".join(c["char"] for c in more["chars"]) == text[:1800]
    whole = invoke("eval", tiny["run"], "--data", path, "--show", "--limit", 0, "--json").json()
    assert "".join(c["char"] for c in whole["chars"]) == text and whole["limit"] == 0
    # Windows scored in batches give each character the bits they gave it one window at a time.
    assert whole["chars"][0]["bits"] is None
    assert [c["bits"] for c in whole["chars"][1:1000]] == pytest.approx([c["bits"] for c in default["chars"][1:]],
                                                                        rel=1e-4, abs=1e-4)
    nll = invoke("eval", tiny["run"], "--data", path, "--stride", BLOCK_SIZE, "--json").json()["nll"]
    assert whole["mean_bits"] == pytest.approx(nll / math.log(2), rel=1e-4)
    assert_usage_error(invoke("eval", tiny["run"], "--limit", 10), "--limit", "--show")
    assert_usage_error(invoke("eval", tiny["run"], "--show", "--limit", -1), "--limit", "-1")


# ---------------------------------------------------------------------------------------------
# bench: implausible timings are measured again, then flagged (fake timings: no test times anything)
# ---------------------------------------------------------------------------------------------

def _fake_attention_timer(monkeypatch: pytest.MonkeyPatch, stalls: int) -> list[int]:
    """BenchState.time answering for attention with times proportional to the FLOPs (4 ms at T = 64, SDPA
    3x faster), except that the written-out product at T = 128 stalls to the T = 256 time `stalls` times."""
    from minigpt_cli.bench_state import BenchState, Timing

    calls: list[int] = []  # the repeats each timing was asked for

    def fake_time(self, fn, flops=0.0):
        calls.append(self.repeats)
        scale = flops / (4 * self.m.n_head * 64 * 64 * self.m.head_dim)  # 1, 4, 16 for T = 64, 128, 256
        plain = len(calls) % 2 == 1  # each row times the written-out product, then SDPA
        seconds = 4e-3 * scale / (1 if plain else 3)
        if plain and scale == 4 and fake_time.stalls > 0:
            fake_time.stalls -= 1
            seconds = 64e-3
        return Timing(seconds, 0.02 * seconds, seconds, seconds, self.repeats)

    fake_time.stalls = stalls
    monkeypatch.setattr(BenchState, "time", fake_time)
    return calls


@pytest.mark.parametrize("stalls", [1, 2])
def test_bench_measures_an_impossible_attention_row_again_and_flags_it_if_it_stays(stalls, monkeypatch):
    calls = _fake_attention_timer(monkeypatch, stalls)
    args = ("bench", "tiny", "--only", "attention", "--max-seq", 256, "--repeats", 2)
    data = invoke(*args, "--json").json()
    rows = {row["seq_len"]: row for row in data["attention"]["rows"]}
    assert sorted(rows) == [64, 128, 256]
    # The T = 128 row took as long as T = 256's, with a quarter of its FLOPs, and 16x T = 64's for 4x
    # the FLOPs: all three rows were measured again, with the 3 repeats a spread needs (2 repeats, the
    # user's choice, are no doubt in themselves: the first pass timed each row once, with 2).
    assert calls == [2] * 6 + [3] * 6
    if stalls == 1:  # the stall did not come back: the second measurement stands, trusted
        assert all(row["trusted"] for row in rows.values())
        assert rows[128]["plain_ms"]["median_ms"] == pytest.approx(16)
        assert not any("implausible" in note for note in data["notes"])
        return
    assert rows[128]["trusted"] is False
    assert "about the same time at T=256 as at T=128, for 4.0x the FLOPs" in rows[128]["reason"]
    assert "16x the time at T=128 as at T=64" in rows[128]["reason"]
    assert any("still implausible" in note for note in data["notes"])
    _fake_attention_timer(monkeypatch, stalls)
    people = invoke(*args)
    lines = people.stdout.splitlines()
    assert any(line.lstrip("│ ").startswith("128 !") for line in lines), people.stdout
    # A reason shared by the two rows that disagree is said once, naming both.
    assert any(line.startswith("! T = 128, 256: not to be trusted: the written-out product took about the same")
               for line in lines), people.stdout


def test_decode_rows_faster_than_their_flops_or_their_floor_allow_are_doubted():
    from minigpt_cli.bench_sample import decode_doubts

    def row(context, cached_ms, uncached_ms, floor_pct=20.0):
        timing = lambda t: {"median_ms": t, "mad_ms": 0.01 * t, "min_ms": t, "max_ms": t, "repeats": 10}
        cached_flops = 1e6 + 1e3 * (context + 1)
        return {"context": context, "cached_flops": cached_flops, "uncached_flops": (context + 1) * cached_flops,
                "cached_ms": timing(cached_ms), "uncached_ms": timing(uncached_ms),
                "cache_speedup": uncached_ms / cached_ms, "floor_pct": floor_pct}

    plausible = [row(15, 1.0, 10.0), row(63, 1.05, 40.0), row(127, 1.1, 90.0)]
    assert not any(decode_doubts(plausible).values())
    # 300x from a cache that saves 64x the FLOPs; a step in less time than reading its weights takes.
    doubts = decode_doubts([row(15, 1.0, 10.0), row(63, 0.13, 40.0, floor_pct=160.0), row(127, 1.1, 90.0)])
    assert "beyond the 64.0x fewer FLOPs" in " ".join(doubts[1])
    assert "beat the weight-read floor" in " ".join(doubts[1])
    # The cached step does nearly the same work at both contexts: its fall alone blames no neighbour.
    assert not doubts[0]
    # The uncached step does 4x the FLOPs at context 63: less time there is impossible.
    doubts = decode_doubts([row(15, 1.0, 10.0), row(63, 1.05, 5.0), row(127, 1.1, 90.0)])
    assert "less time at context 63 than at context 15" in " ".join(doubts[0] + doubts[1])


def test_bench_doubts_are_judged_as_the_device_and_the_users_repeats_allow():
    from minigpt_cli.bench_state import growth_doubts, settle, spread_doubts
    from minigpt_cli.output import ms

    timing = lambda t, repeats=10: {"median_ms": t, "mad_ms": 0.0, "min_ms": t, "max_ms": t, "repeats": repeats}
    # A single run (--repeats 1) has no spread: not a doubt, and not printed as a precise ±0%.
    assert spread_doubts(timing(2.0, repeats=1), "x") == []
    assert ms(timing(2.0, repeats=1)) == "2 ms (1 run)" and "±" in ms(timing(2.0))
    # A flat time for 4x the FLOPs is a stall on a CPU; on a GPU it is the kernel launches' fixed cost.
    flat = [("T=64", 1e6, timing(3.0)), ("T=128", 4e6, timing(3.1))]
    assert growth_doubts(flat, "step", cpu=True) and not growth_doubts(flat, "step", cpu=False)
    # Only rows measured again can end flagged: a neighbour that disagrees with a re-measured row keeps
    # its first, unquestioned measurement and its trust.
    rows = [{"t": 1.0}, {"t": 1.0}, {"t": 1.0}]

    def doubts(rows):
        return {1: ["stalled"]} if rows[1]["t"] == 1.0 else {1: ["late"], 2: ["late"]}

    assert settle(rows, doubts, lambda i: {"t": 2.0}) == 1
    assert [row["trusted"] for row in rows] == [True, False, True]


@pytest.mark.parametrize("config", ["default", "classic"])
def test_inspect_and_bench_count_the_same_forward_flops(config):
    from minigpt_cli.bench_state import BenchOptions, BenchState
    from minigpt_cli.device import runtime
    from minigpt_cli.targets import resolve_target

    inspected = invoke("inspect", config, "--json").json()
    flops = inspected["flops_per_token"]
    benched = invoke("bench", config, "--only", "attention", "--max-seq", 64, "--repeats", 3, "--json").json()
    counted = flops.pop("counted")  # torch's counter, inspect's alone
    assert benched["model"]["flops_per_token"] == flops
    assert counted["forward"] == flops["forward"]
    assert benched["flops_convention"] == inspected["flops_convention"] == flops["convention"]
    target = resolve_target(config)
    with runtime("cpu", target.config.train.dtype) as rt:
        state = BenchState(target, BenchOptions(device="cpu"), rt)
        T = flops["seq_len"]  # 128 tokens of the config's own window, as bench's uncached decode computes them
        assert state.forward_flops(T, T) == T * flops["forward"]
    # The short convolutions are counted (default has them, classic not), and the same way in both.
    assert (flops["short_conv_forward"] > 0) == (config == "default")
    assert flops["forward"] == 2 * flops["matmul_params"] + flops["attention_forward"] + flops["short_conv_forward"]


# ---------------------------------------------------------------------------------------------
# Issue 28: what reads badly at 80 columns, in a pipe
# ---------------------------------------------------------------------------------------------

SHIPPED_CONFIGS = sorted(path.stem for path in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_inspect_fits_80_columns_and_keeps_every_shape_whole(name: str, at_80_columns: None):
    data = invoke("inspect", name, "--json").json()
    got = invoke("inspect", name)
    assert got.exit_code == 0, got.stderr
    assert_fits_80(got.stdout)
    words = set(got.stdout.replace("│", " ").split())
    for row in data["shapes"]:
        assert "(" + ", ".join(map(str, row["shape"])) + ")" in got.stdout, row  # on one line
        assert set(row["symbols"].split()) <= words, row  # wrapped at a space, never folded inside a name


def test_counts_are_written_as_the_field_writes_them():
    from minigpt_cli.output import count, si

    assert (count(1_557_611_200), count(124_439_808), count(28_896)) == ("1.56B", "124.44M", "28.90k")
    assert si(3.11e9) == "3.11G"  # a prefix to a unit: GFLOP
    people = invoke("inspect", "gpt2_xl", "--vocab-size", 50257).stdout
    assert "1.56B parameters with GPT-2's own vocabulary" in people and "1.56G" not in people
    assert "GFLOP per token" in people and "BFLOP" not in people


def test_eval_show_fits_80_columns(tiny, tmp_path: Path, at_80_columns: None):
    text = BUNDLED_TEXT.read_text(encoding="utf-8")[:3000]
    long_line = " ".join(text.split())[:400]  # a text whose lines are longer than the terminal
    path = tmp_path / "long.txt"
    path.write_text(long_line + "\n" + text, encoding="utf-8")
    got = invoke("eval", tiny["run"], "--show", "--data", path)
    assert got.exit_code == 0, got.stderr
    assert_fits_80(got.stdout)
    assert long_line.split()[40] in got.stdout and "hardest characters" in got.stdout
    hardest = got.stdout.split("hardest characters")[1].splitlines()[1:]
    assert len(hardest) == 8 and all(" after " in line and "bits, context" in line for line in hardest)
