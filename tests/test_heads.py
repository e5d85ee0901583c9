"""What each attention head does: the offsets, sink and induction measures and the pattern named, on
matrices built by hand, on a model that learned to copy, and in inspect --attention's view."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import cli_command, cli_env, invoke, train_in_process
from minigpt_cli.heads import NAME_AT, head_profile, induction_baseline, induction_targets

# Two blocks of distinct characters, each said twice: from position 6 on every character repeats one six
# back, so copying what followed it last time predicts the next one.
REPEATS = "hcjafbhcjafbegdiegdi"


def ids_of(text: str) -> list[int]:
    return [ord(c) for c in text]


def rows_to(T: int, key_of) -> torch.Tensor:
    """(T, T) weights where row i puts all its weight on key_of(i) (a position 0..i)."""
    weights = torch.zeros(T, T)
    for i in range(T):
        weights[i, key_of(i)] = 1.0
    return weights


def uniform(T: int) -> torch.Tensor:
    causal = torch.ones(T, T).tril()
    return causal / causal.sum(dim=-1, keepdim=True)


def induction_matrix(text: str) -> torch.Tensor:
    """Each position with an induction target spreads its weight over its targets; the others read
    positions 0..i evenly."""
    targets = induction_targets(ids_of(text)).float()
    rows = targets.sum(dim=-1, keepdim=True)
    return torch.where(rows > 0, targets / rows.clamp(min=1), uniform(len(text)))


# ---------------------------------------------------------------------------------------------
# The detector on matrices built by hand
# ---------------------------------------------------------------------------------------------

def test_each_pure_pattern_is_named_and_uniform_attention_is_not():
    T, ids = len(REPEATS), ids_of(REPEATS)
    previous = head_profile(rows_to(T, lambda i: max(i - 1, 0)), ids)
    assert previous["pattern"] == "previous" and previous["offsets"]["-1"] == 1.0
    assert previous["offsets"]["0"] == 0.0 and previous["offsets"]["-2"] == 0.0
    itself = head_profile(torch.eye(T), ids)
    assert itself["pattern"] == "self" and itself["offsets"]["0"] == 1.0 and itself["first"] == 0.0
    first = head_profile(rows_to(T, lambda i: 0), ids)
    assert first["pattern"] == "first" and first["first"] == 1.0
    assert first["offsets"]["-1"] == 0.0  # position 1 reading position 0 counts as "first", not as -1
    induction = head_profile(induction_matrix(REPEATS), ids)
    assert induction["pattern"] == "induction" and induction["induction"] == 1.0
    flat = head_profile(uniform(T), ids)
    assert flat["pattern"] is None
    assert max(flat["offsets"]["0"], flat["offsets"]["-1"], flat["first"], flat["induction"]) < NAME_AT


def test_a_head_split_between_two_patterns_is_not_named():
    T, ids = len(REPEATS), ids_of(REPEATS)
    half = 0.5 * torch.eye(T) + 0.5 * rows_to(T, lambda i: max(i - 1, 0))
    profile = head_profile(half, ids)
    assert profile["offsets"]["0"] == pytest.approx(0.5) and profile["offsets"]["-1"] == pytest.approx(0.5)
    assert profile["pattern"] is None


def test_offsets_average_over_the_positions_where_each_exists():
    T = 12
    back_two = rows_to(T, lambda i: max(i - 2, 0))
    offsets = head_profile(back_two, ids_of("abcdefghijkl"))["offsets"]
    # Rows 3..11 read offset -2 (row 2's key -2 is position 0, counted as "first"); rows 1..2 have no -2
    # that is not the first character and are left out of its mean rather than counted as 0.
    assert offsets["-2"] == 1.0 and offsets["-8"] == 0.0
    assert offsets["rest"] == 0.0  # keys 1 .. i-9 exist from row 10 on
    assert head_profile(torch.eye(3), ids_of("abc"))["offsets"]["-8"] is None  # no position has it


def test_induction_targets_follow_earlier_occurrences_and_skip_the_self_and_previous_ones():
    targets = induction_targets(ids_of("abcab"))
    # "a" at 3 follows "a" at 0: target 1 ("b"); "b" at 4 follows "b" at 1: target 2 ("c").
    assert targets.nonzero().tolist() == [[3, 1], [4, 2]]
    # "aa" (target: itself) and "aba" (target: the previous character) are no evidence of copying.
    assert not induction_targets(ids_of("aab")).any() and not induction_targets(ids_of("aba")).any()
    assert induction_baseline(ids_of("abcdef")) == {"positions": 0, "uniform": None}
    baseline = induction_baseline(ids_of("abcab"))
    assert baseline["positions"] == 2 and baseline["uniform"] == pytest.approx((1 / 4 + 1 / 5) / 2)


def test_too_few_repeating_positions_name_no_induction():
    text = "abcdab"  # two positions with an induction target: shown, not named
    profile = head_profile(induction_matrix(text), ids_of(text))
    assert profile["induction"] == 1.0 and profile["pattern"] is None


# ---------------------------------------------------------------------------------------------
# A model that learned to copy
# ---------------------------------------------------------------------------------------------

COPY_ALPHABET = "abcdefghij"


def copy_text(seed: int, blocks: int) -> str:
    """Blocks of 3 to 6 distinct characters, each said four times: past a block's first saying, the next
    character is the one that followed the current one last time, which only copying can know."""
    rng = random.Random(seed)
    return "".join("".join(rng.sample(COPY_ALPHABET, rng.randint(3, 6))) * 4 for _ in range(blocks))


@pytest.fixture(scope="module")
def copy_run(module_dir: Path) -> Path:
    corpus = module_dir / "copy.txt"
    corpus.write_text(copy_text(seed=0, blocks=6000), encoding="utf-8")  # ~110k characters: no memorising
    run_dir = module_dir / "runs" / "copy"
    # The tiny model with a short convolution of 2: each key also carries the character before it, so one
    # attention layer can find "the position after an earlier me" (without it, induction needs a
    # previous-character head in one layer and the match in the next, and takes far more steps).
    train_in_process([f"data.path={corpus}", "model.short_conv=2", "train.optimizer=muon", "train.max_iters=200",
                      "train.eval_interval=1000", "train.eval_iters=2", "train.log_interval=50",
                      "train.device=cpu"], run_dir)
    return run_dir


def test_a_model_trained_to_copy_has_an_induction_head(copy_run: Path):
    from minigpt_cli.inspection import attention

    result = attention(str(copy_run), REPEATS)
    heads = [head for layer in result["layers"] for head in layer["heads"]]
    assert any(head["pattern"] == "induction" for head in heads), [h["induction"] for h in heads]
    best = max(head["induction"] for head in heads)
    assert best >= 3 * result["induction_baseline"]["uniform"]  # far above what reading evenly scores


# ---------------------------------------------------------------------------------------------
# The view: inspect --attention
# ---------------------------------------------------------------------------------------------

def test_inspect_attention_names_each_heads_pattern_in_json_and_in_80_columns(copy_run: Path):
    got = invoke("inspect", copy_run, "--attention", REPEATS, "--json")
    assert got.exit_code == 0, got.stderr
    data = got.json()
    heads = [head for layer in data["layers"] for head in layer["heads"]]
    assert len(heads) == 4 and data["qk_norm"] is True and data["short_conv"] == 2
    for head in heads:
        assert head["pattern"] in (None, "self", "previous", "first", "induction")
        assert set(head["offsets"]) == {"0", "-1", "-2", "-3", "-4", "-5", "-6", "-7", "-8", "rest"}
        assert 0 <= head["first"] <= 1 and 0 <= head["induction"] <= 1
    env = {**cli_env(), "COLUMNS": "80"}
    view = subprocess.run(cli_command("inspect", copy_run, "--attention", REPEATS), capture_output=True, text=True,
                          env=env, timeout=180, cwd=os.getcwd(), check=False)
    assert view.returncode == 0, view.stderr
    lines = view.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    text = " ".join(line.strip() for line in lines)
    assert "RMS-normalised" in text and "RoPE" in text and "short_conv = 2" in text
    assert "at least 0.4 and 0.15 above the next" in text  # the rule behind every name
    for layer in data["layers"]:  # every head's row whole: its numbers and its pattern, none cut
        for head in layer["heads"]:
            offsets = head["offsets"]
            cells = [layer["layer"], head["head"], *(f"{v:.2f}" for v in (offsets["0"], offsets["-1"], offsets["-2"],
                     offsets["-3"], head["first"], head["induction"])), head["pattern"] or "-"]
            assert any(line.split("│")[1:-1] and [c.strip() for c in line.split("│")[1:-1]] == list(map(str, cells))
                       for line in lines), cells
