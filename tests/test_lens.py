"""The logit lens (inspect --lens): each layer's residual stream read through the model's own final
norm and head. Its last layer is the model's output, every reading is a distribution, and on a
trained model the later layers predict the text better than the embeddings alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from conftest import assert_usage_error, cli_command, cli_env, invoke, train_in_process, write_small_corpus
from minigpt_cli.config import ModelConfig
from minigpt_cli.lens import lens, lens_probabilities
from minigpt_cli.model import GPT

VOCAB = 29
SMALL = dict(n_layer=3, n_head=2, n_embd=16, block_size=24, dropout=0.0)
VARIANTS = {
    "default": dict(),  # rope, rmsnorm, qk-norm, no tied weights
    "default-softcap-short-conv": dict(logit_softcap=15.0, short_conv=4),
    "classic": dict(pos_encoding="learned", norm="layernorm", activation="gelu", qk_norm=False, tie_weights=True,
                    bias=True, zero_init_proj=False),
    "post-norm-sinusoidal": dict(pos_encoding="sinusoidal", norm_placement="post", logit_softcap=10.0),
}
BLOCK_SIZE = 32
CLASSIC_SHAPE = ("model.n_layer=2", "model.n_head=2", "model.n_embd=32")


def random_model(**overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**SMALL, **overrides}), VOCAB)
    with torch.no_grad():  # zero-initialised projections would make every block the identity
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_last_layer_is_the_models_own_output(variant: dict):
    model = random_model(**variant)
    idx = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    probs = lens_probabilities(model, idx)
    assert probs.shape == (SMALL["n_layer"] + 1, 20, VOCAB)
    with torch.no_grad():
        own = model(idx)[0].softmax(dim=-1)
    torch.testing.assert_close(probs[-1], own, rtol=1e-5, atol=1e-6)
    for layer in range(SMALL["n_layer"]):  # each layer is read from its own stream, not the last one
        assert (probs[layer] - own).abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_layers_reading_is_a_distribution(variant: dict):
    probs = lens_probabilities(random_model(**variant), torch.arange(VOCAB - 5)[None])
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(probs.shape[:2]))


@pytest.fixture(scope="module")
def runs(module_dir: Path) -> dict:
    """Two runs trained for a few seconds on the same text: the tiny default-shaped model, and the
    classic config (learned positions, LayerNorm, tied weights) at the tiny model's size."""
    corpus = write_small_corpus(module_dir / "small.txt")
    common = [f"data.path={corpus}", "train.max_iters=80", "train.eval_interval=80", "train.eval_iters=1",
              "train.batch_size=8", f"model.block_size={BLOCK_SIZE}", "train.device=cpu"]
    train_in_process(common, module_dir / "default")
    train_in_process([*common, *CLASSIC_SHAPE], module_dir / "classic", config="classic")
    return {"default": module_dir / "default", "classic": module_dir / "classic",
            "text": corpus.read_text(encoding="utf-8")[:BLOCK_SIZE]}


@pytest.mark.parametrize("name", ["default", "classic"])
def test_later_layers_spend_fewer_bits_on_the_training_text(runs: dict, name: str):
    result = lens(str(runs[name]), runs["text"])
    layers = result["layers"]
    assert len(layers) == 3 and layers[0]["after"] == "embeddings" and layers[-1]["after"] == "block 2"
    assert layers[-1]["mean_bits"] < layers[0]["mean_bits"] - 0.2
    assert layers[-1]["mean_p_next"] > layers[0]["mean_p_next"]
    assert result["tie_weights"] is (name == "classic")


def test_inspect_lens_json_gives_every_position_and_layer(runs: dict):
    text = "First Citizen:\nBefore we"
    got = invoke("inspect", runs["default"], "--lens", text, "--json")
    assert got.exit_code == 0, got.stderr
    data = got.json()
    assert data["text"] == text and data["n_layer"] == 2 and len(data["layers"]) == 3
    assert [p["char"] for p in data["positions"]] == list(text)
    assert [p["next"] for p in data["positions"]] == [*text[1:], None]
    for position in data["positions"]:
        assert len(position["layers"]) == 3
        for cell in position["layers"]:
            ps = [guess["p"] for guess in cell["top"]]
            assert len(ps) == 3 and ps == sorted(ps, reverse=True) and sum(ps) <= 1 + 1e-6
            if position["next"] is None:
                assert "p_next" not in cell  # the last character has no true next one
            else:
                assert 0 < cell["p_next"] <= 1
    summary = data["layers"][1]
    scored = [p["layers"][1]["bits"] for p in data["positions"][:-1]]
    assert summary["positions"] == len(text) - 1
    assert summary["mean_bits"] == pytest.approx(sum(scored) / len(scored))
    one = invoke("inspect", runs["default"], "--lens", "F", "--json").json()  # nothing to score, a guess each layer
    assert [layer["mean_bits"] for layer in one["layers"]] == [None] * 3
    assert all(len(cell["top"]) == 3 for cell in one["positions"][0]["layers"])
    people = invoke("inspect", runs["default"], "--lens", "F")
    assert people.exit_code == 0 and "no next character" in people.stdout


def test_inspect_lens_table_names_the_layers_and_their_means(runs: dict):
    got = invoke("inspect", runs["classic"], "--lens", "To be, or not")
    assert got.exit_code == 0, got.stderr
    for fragment in ("logit lens", "residual stream", "final norm and head", "model's own output", "emb", "out",
                     "mean bits", "block 2 (output)", "␣"):
        assert fragment in got.stdout, fragment


def test_inspect_lens_bad_input_exits_2_with_one_line(runs: dict):
    run = runs["default"]
    assert_usage_error(invoke("inspect", run, "--lens", ""), "--lens", "at least one character")
    assert_usage_error(invoke("inspect", run, "--lens", "Zebra ☃"), "vocabulary", "☃")
    assert_usage_error(invoke("inspect", run, "--lens", "x" * (BLOCK_SIZE + 1)), f"{BLOCK_SIZE + 1} characters",
                       f"block_size ({BLOCK_SIZE})")
    assert_usage_error(invoke("inspect", "tiny", "--lens", "To be"), "trained run")
    assert_usage_error(invoke("inspect", run, "--lens", "To be", "--attention", "To be"), "--attention")
    assert_usage_error(invoke("inspect", run, "--lens", "To be", "--set", "model.n_layer=3"), "--set")


def test_a_deep_models_lens_wraps_into_tables_that_fit_80_columns(module_dir: Path):
    run = module_dir / "deep"
    corpus = write_small_corpus(module_dir / "deep.txt", 2_000)
    train_in_process([f"data.path={corpus}", "train.max_iters=1", "train.eval_iters=1", "train.batch_size=2",
                      "model.n_layer=12", "model.n_embd=16", "model.block_size=64", "train.device=cpu"], run)
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    proc = subprocess.run(cli_command("inspect", run, "--lens", text), capture_output=True, text=True,
                          env={**cli_env(), "COLUMNS": "80"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    groups = [[int(n) for n in line.split()[1::2]] for line in lines if line.startswith("layers ")]
    assert len(groups) > 1 and groups[0][0] == 0 and groups[-1][1] == 12  # several tables, every layer once
    assert all(later[0] == earlier[1] + 1 for earlier, later in zip(groups, groups[1:]))
    assert "block 12 (output)" in proc.stdout
    header = [line for line in lines if line.startswith("┃")]
    assert sum(line.count("out") for line in header) == 1 and sum(line.count("emb") for line in header) == 1
