"""The character vocabulary: exact round trips on any Unicode text, and errors that name characters."""

from __future__ import annotations

import json
import random

import pytest

from minigpt_cli.config import UserError
from minigpt_cli.tokenizer import CharTokenizer, UnknownCharactersError

EDGE_CASES = [
    "hello, world\n",
    "Grüße aus Köln — naïve café",
    "日本語のテキストと中文",
    "emoji 🙂👍🏽 and flags 🇩🇪 (astral plane)",
    "e\u0301 combining accent, \u200b zero width, \ufeff BOM inside",
    "\x00\x01\x7f control characters\r\n\t",
    "\U0010ffff last code point",
]


def random_text(rng: random.Random, length: int) -> str:
    """Code points from the whole Unicode range except surrogates (which UTF-8 text cannot hold)."""
    chars = []
    while len(chars) < length:
        cp = rng.choice([rng.randrange(0x20, 0x80), rng.randrange(0x80, 0x800),
                         rng.randrange(0x800, 0x10000), rng.randrange(0x10000, 0x110000)])
        if 0xD800 <= cp <= 0xDFFF:
            continue
        chars.append(chr(cp))
    return "".join(chars)


@pytest.mark.parametrize("text", EDGE_CASES)
def test_round_trip_edge_cases(text: str):
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) == len(text)
    assert tokenizer.vocab_size == len(set(text))
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


@pytest.mark.parametrize("seed", range(20))
def test_round_trip_random_unicode(seed: int):
    rng = random.Random(seed)
    text = random_text(rng, rng.randrange(1, 400))
    tokenizer = CharTokenizer.from_text(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    # The vocabulary survives its JSON form (what a checkpoint stores) with the same ids.
    again = CharTokenizer.from_dict(json.loads(json.dumps(tokenizer.to_dict())))
    assert again.chars == tokenizer.chars
    assert again.encode(text) == tokenizer.encode(text)


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_encoding_matches_encode(seed: int):
    from minigpt_cli.corpus import encode_array

    rng = random.Random(seed)
    text = random_text(rng, 300)
    tokenizer = CharTokenizer.from_text(text)
    assert encode_array(text, tokenizer).tolist() == tokenizer.encode(text)


def test_vocabulary_is_sorted_and_independent_of_order():
    assert CharTokenizer.from_text("cab").chars == ["a", "b", "c"]
    assert CharTokenizer.from_text("bca").stoi == CharTokenizer.from_text("abc").stoi


def test_unknown_characters_are_named():
    tokenizer = CharTokenizer.from_text("abc ")
    with pytest.raises(UnknownCharactersError) as info:
        tokenizer.encode("a zebra 🙂 and \x00", where="the prompt")
    message = str(info.value)
    assert isinstance(info.value, UserError)
    for char in ["z", "e", "r", "n", "d", "🙂"]:
        assert repr(char) in message
    assert "'\\x00'" in message  # unprintable characters are shown escaped
    assert "the prompt" in message
    assert set(info.value.chars) == {"z", "e", "r", "n", "d", "🙂", "\x00"}


def test_many_unknown_characters_are_summarised():
    tokenizer = CharTokenizer.from_text("a")
    with pytest.raises(UnknownCharactersError) as info:
        tokenizer.encode("bcdefghijklmnopqrstuvwxyz")
    assert "25 character(s)" in str(info.value)
    assert len(str(info.value)) < 300


def test_vectorised_encoding_names_unknown_characters():
    from minigpt_cli.corpus import encode_array

    tokenizer = CharTokenizer.from_text("abc")
    with pytest.raises(UnknownCharactersError, match="'x'"):
        encode_array("abcx", tokenizer)


def test_empty_text_has_no_vocabulary():
    with pytest.raises(UserError):
        CharTokenizer.from_text("")


@pytest.mark.parametrize("raw", [None, {}, {"type": "bpe", "chars": "ab"}, {"type": "char", "chars": 3}])
def test_from_dict_rejects_what_is_not_a_char_vocabulary(raw):
    with pytest.raises(ValueError):
        CharTokenizer.from_dict(raw)
