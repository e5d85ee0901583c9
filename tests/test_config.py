"""Config: every shipped file loads, and bad keys, types and values are rejected by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS_DIR, assert_usage_error, invoke, set_flags
from minigpt_cli.config import (Config, UserError, apply_overrides, from_dict, load_config, parse_value,
                                shipped_configs)

SHIPPED = sorted(CONFIGS_DIR.glob("*.yaml"))


def test_configs_folder_is_not_empty():
    assert SHIPPED, f"no configs found in {CONFIGS_DIR}"
    assert [p.stem for p in SHIPPED] == shipped_configs()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_config_loads_and_builds_a_model(path: Path):
    import torch

    from minigpt_cli.model import GPT

    by_name = load_config(path.stem)
    by_path = load_config(str(path))
    assert by_name == by_path
    assert by_name.name == path.stem
    # Every key in the file is a real key (load_config would have raised otherwise) and took effect.
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for section, values in raw.items():
        for key, value in (values or {}).items():
            got = getattr(getattr(by_name, section), key)
            assert got == value or (isinstance(got, float) and got == float(value)), f"{section}.{key}"
    # On the meta device: shapes are checked without allocating (some shipped models are GPT-2 XL sized).
    with torch.device("meta"):
        model = GPT(by_name.model, vocab_size=65)
        logits = model(torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape == (1, 4, 65)


def test_config_round_trips_through_its_dict():
    config = load_config("tiny")
    again = from_dict(config.to_dict(), name="tiny")
    assert again == config


def test_scientific_notation_is_a_float(tmp_path: Path):
    # PyYAML reads 1e-3 (no dot) as a string; the loader must still give a float.
    path = tmp_path / "sci.yaml"
    path.write_text("train:\n  learning_rate: 1e-3\n  min_lr: 1e-4\n", encoding="utf-8")
    config = load_config(str(path))
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert isinstance(config.train.learning_rate, float)


def test_a_checkpoint_saved_before_epochs_resumes_with_random_windows():
    from minigpt_cli.config import config_from_checkpoint_dict

    saved = load_config("default").to_dict()
    assert config_from_checkpoint_dict(saved).train.sampling == "epochs"
    del saved["train"]["sampling"]
    assert config_from_checkpoint_dict(saved).train.sampling == "random"


def test_config_is_frozen():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.n_layer = 3  # type: ignore[misc]


@pytest.mark.parametrize("text, fragments", [
    ("model:\n  n_layr: 2\n", ["model.n_layr", "n_layer"]),
    ("train:\n  learning_rat: 0.1\n", ["train.learning_rate", "learning_rat"]),
    ("modle:\n  n_layer: 2\n", ["modle", "model"]),
])
def test_unknown_key_names_it_and_suggests_the_nearest(tmp_path: Path, text: str, fragments: list[str]):
    path = tmp_path / "typo.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_config(str(path))
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("text, key", [
    ("model:\n  n_layer: two\n", "model.n_layer"),
    ("model:\n  n_layer: 2.5\n", "model.n_layer"),
    ("model:\n  tie_weights: maybe\n", "model.tie_weights"),
    ("train:\n  learning_rate: fast\n", "train.learning_rate"),
    ("train:\n  batch_size: [1, 2]\n", "train.batch_size"),
    ("model:\n  pos_encoding: alibi\n", "model.pos_encoding"),
    ("train:\n  learning_rate: .nan\n", "train.learning_rate"),
])
def test_wrong_type_names_the_key(tmp_path: Path, text: str, key: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(str(path))


@pytest.mark.parametrize("override, key", [
    ("model.n_embd=30", "model.n_embd"),      # 30 is not divisible by n_head=4
    ("model.n_layer=0", "model.n_layer"),
    ("model.n_head=-2", "model.n_head"),
    ("model.block_size=0", "model.block_size"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.max_iters=-1", "train.max_iters"),
    ("train.learning_rate=0", "train.learning_rate"),
    ("model.dropout=1.5", "model.dropout"),
    ("data.val_fraction=0", "data.val_fraction"),
    ("data.val_fraction=1", "data.val_fraction"),
    ("train.grad_accum_steps=0", "train.grad_accum_steps"),
    ("train.stop_after=-1", "train.stop_after"),
    ("model.short_conv=-1", "model.short_conv"),
    ("model.short_conv=1000", "model.short_conv"),  # wider than block_size
    ("train.sampling=shuffled", "train.sampling"),
    ("train.short_windows=1.5", "train.short_windows"),
])
def test_impossible_values_are_rejected(override: str, key: str):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        apply_overrides(load_config("default"), [override])


def test_set_converts_values_like_the_yaml_file():
    config = apply_overrides(load_config("tiny"), ["model.n_layer=3", "train.learning_rate=1e-3",
                                                   "model.tie_weights=true", "data.path=some/file.txt"])
    assert config.model.n_layer == 3
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.model.tie_weights is True
    assert config.data.path == "some/file.txt"
    assert parse_value("4") == 4


@pytest.mark.parametrize("text", ["-", "~", "yes", "null", "notes: v2.txt", "[a].txt", "007"])
def test_set_text_fields_keep_the_text_as_typed(text: str):
    # '--data -' (stdin) becomes data.path=-, which YAML alone would read as a list.
    assert apply_overrides(load_config("tiny"), [f"data.path={text}"]).data.path == text


def test_duplicate_key_is_an_error(tmp_path: Path):
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  n_layer: 2\n  n_layer: 3\n", encoding="utf-8")
    with pytest.raises(UserError, match="n_layer"):
        load_config(str(path))


def test_python_object_tags_are_refused_and_never_run(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n", encoding="utf-8")
    with pytest.raises(UserError):
        load_config(str(path))
    assert not marker.exists()
    result = invoke("train", path)
    assert_usage_error(result, str(path))
    assert not marker.exists()


# -- through the CLI: exit code 2 and one line that names the problem ------------------------------

def test_cli_typo_in_config_file(tmp_path: Path):
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  n_layr: 2\n", encoding="utf-8")
    assert_usage_error(invoke("train", path), "model.n_layr", "did you mean 'model.n_layer'")


def test_cli_unknown_set_key_suggests_the_nearest():
    assert_usage_error(invoke("train", "tiny", *set_flags("train.max_iter=5")), "train.max_iter", "max_iters")


def test_cli_wrong_type_in_set():
    assert_usage_error(invoke("train", "tiny", *set_flags("model.n_layer=two")), "model.n_layer", "two")


def test_cli_impossible_value():
    assert_usage_error(invoke("train", "tiny", *set_flags("model.n_embd=33")), "model.n_embd", "model.n_head")


def test_cli_empty_config_file(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert_usage_error(invoke("train", path), "empty")


def test_cli_unknown_config_name_suggests_a_shipped_one():
    assert_usage_error(invoke("train", "tinny"), "tinny", "tiny")


def test_cli_missing_config_file(tmp_path: Path):
    assert_usage_error(invoke("train", tmp_path / "nope.yaml"), "nope.yaml")


# -- what a hostile config or --set gets: one line, quickly (issue 25) -------------------------------

@pytest.mark.parametrize("text", [
    "model:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(500)) + "  " * 501 + "x: 1\n",
    "model: " + "[" * 500 + "]" * 500 + "\n",
    "model:\n  n_layer: " + "7" * 5000 + "\n",
], ids=["500-deep-block", "500-deep-flow", "5000-digit-integer"])
def test_a_pathological_yaml_is_one_line(tmp_path: Path, text: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert_usage_error(invoke("train", path), str(path))


@pytest.mark.parametrize("value", ["[" * 500 + "]" * 500, "7" * 5000], ids=["500-deep", "5000-digits"])
def test_a_pathological_set_value_is_one_line(value: str):
    assert_usage_error(invoke("train", "tiny", "--set", f"model.n_layer={value}"), "--set")


def test_a_huge_config_is_refused_before_parsing(tmp_path: Path):
    path = tmp_path / "huge.yaml"
    path.write_text("model:\n" + "".join(f"  k{i}: {i}\n" for i in range(200_000)))  # 3 MB
    assert_usage_error(invoke("train", path), "MiB")


def test_a_fifo_config_is_refused_not_waited_on(tmp_path: Path):
    import os

    from conftest import run_cli

    os.mkfifo(tmp_path / "pipe.yaml")
    assert_usage_error(run_cli("train", tmp_path / "pipe.yaml", timeout=60), "not a regular file")


def test_comments_and_aligned_lines_are_not_nesting(tmp_path: Path):
    text = (CONFIGS_DIR / "tiny.yaml").read_text()
    text += "".join(f"# a fraction in [0, 1) {i}\n" for i in range(20))
    text += "".join(" " * i + f"# aligned at column {i}\n" for i in range(20))
    path = tmp_path / "commented.yaml"
    path.write_text(text)
    assert load_config(str(path)).model == load_config("tiny").model
