"""The learner's views of a run: `sample --top` (what the model weighed before each character)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import assert_usage_error, invoke

PROMPT = "ROMEO:"


def _json(run: Path, *flags: object) -> dict:
    got = invoke("sample", run, "--prompt", PROMPT, "--seed", 11, "--json", *flags)
    assert got.exit_code == 0, got.stderr
    return got.json()


def test_sample_top_json_gives_every_step_of_the_text_it_made(tiny_run: Path):
    data = _json(tiny_run, "--top", 5, "-n", 40, "--top-k", 8)
    steps = data["steps"]
    assert "".join(s["char"] for s in steps) == data["samples"][0] and len(steps) == 40
    for s in steps:
        probs = [p for _, p in s["top"]]
        assert 1 <= len(probs) <= 5 and probs == sorted(probs, reverse=True)
        assert all(0 < p <= 1 for p in probs) and sum(probs) <= 1 + 1e-6
        assert s["bits"] == pytest.approx(-math.log2(s["prob"]))
        # The drawn character's probability is the one the top list gives it, where it is listed.
        listed = dict(s["top"])
        if s["char"] in listed:
            assert listed[s["char"]] == s["prob"]
        else:
            assert s["prob"] <= probs[-1]
    assert data["settings"]["top"] == 5


def test_sample_top_makes_the_same_text_as_without_it(tiny_run: Path):
    for flags in ((), ("--top-p", 0.9, "--min-p", 0.05), ("--repetition-penalty", 1.3, "--temperature", 1.2)):
        plain = _json(tiny_run, "-n", 60, *flags)["samples"]
        weighed = _json(tiny_run, "-n", 60, "--top", 3, *flags)["samples"]
        assert weighed == plain, flags


def test_sample_top_greedy_draws_the_top_character_with_probability_one(tiny_run: Path):
    for s in _json(tiny_run, "--top", 4, "-n", 20, "--temperature", 0)["steps"]:
        assert s["top"] == [[s["char"], 1.0]] and s["prob"] == 1.0 and s["bits"] == 0.0


def test_sample_top_steps_stop_where_the_text_stops(tiny_run: Path):
    plain = _json(tiny_run, "-n", 200, "--stop", "e")
    data = _json(tiny_run, "-n", 200, "--stop", "e", "--top", 2)
    assert data["samples"] == plain["samples"]
    assert "".join(s["char"] for s in data["steps"]) == data["samples"][0]


def test_sample_top_for_people_streams_a_line_per_character_within_80_columns(tiny_run: Path):
    got = invoke("sample", tiny_run, "--prompt", PROMPT, "--seed", 5, "-n", 30, "--top", 12, "--top-k", 20)
    assert got.exit_code == 0, got.stderr
    lines = got.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    header = " ".join(lines[:5])
    for fragment in ("12 most likely", "temperature 0.8", "top-k 20", "off: top-p, min-p, repetition penalty",
                     "bits", f"prompt: '{PROMPT}'"):
        assert fragment in header, fragment
    steps = [line for line in lines if " bits)  top: " in line]
    assert len(steps) == 30
    text = _json(tiny_run, "--seed", 5, "-n", 30, "--top-k", 20)["samples"][0]
    # The text after the steps, and each step's character shown visibly: ↵ for a newline, ␣ for a space.
    shown = "".join(line[1:line.index(line[0], 1)] for line in steps)  # in '' or, for an apostrophe, ""
    assert shown == text.replace("\n", "↵").replace(" ", "␣")
    assert got.stdout.endswith(PROMPT + text + "\n")


def test_sample_top_bad_input_exits_2(tiny_run: Path):
    assert_usage_error(invoke("sample", tiny_run, "--top", 3, "--num-samples", 2), "--top", "--num-samples 2")
    assert_usage_error(invoke("sample", tiny_run, "--top", -1), "--top", "-1")
    assert_usage_error(invoke("sample", tiny_run, "--top", 50, "--json", "-n", 1_000_000), "--top 50 --json")
