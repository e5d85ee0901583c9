"""Character vocabulary: one token per distinct character, sorted by code point (no torch)."""

from __future__ import annotations

from typing import Any, Iterable

from minigpt_cli.config import UserError

# Characters that would not show in a one-column label, as one visible sign each.
SHOWN_AS = {" ": "␣", "\n": "↵", "\t": "⇥"}


def visible_char(c: str) -> str:
    """One column for a character in a label (a heat map's, a table's): space, newline and tab shown
    as signs, anything else unprintable as '?'."""
    return SHOWN_AS.get(c, c if c.isprintable() else "?")


def describe_chars(chars: Iterable[str], limit: int = 10) -> str:
    """Characters as a reader can see them: unprintable ones escaped, e.g. '\\x00' or '\\u200b'."""
    chars = list(chars)
    shown = ", ".join(repr(c) for c in chars[:limit])
    if len(chars) > limit:
        shown += f", ... ({len(chars)} in all)"
    return shown


class UnknownCharactersError(UserError):
    def __init__(self, chars: list[str], where: str = "text"):
        self.chars = chars
        super().__init__(
            f"{where} has {len(chars)} character(s) not in the model's vocabulary: {describe_chars(chars)}"
        )


class CharTokenizer:
    def __init__(self, chars: Iterable[str]):
        self.chars: list[str] = sorted(set(chars))
        if not self.chars:
            raise UserError("cannot build a vocabulary from empty text")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unknown(self, text: str) -> list[str]:
        return sorted(set(text) - self.stoi.keys())

    def encode(self, text: str, where: str = "text") -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            raise UnknownCharactersError(self.unknown(text), where) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, raw: Any) -> "CharTokenizer":
        if not isinstance(raw, dict) or raw.get("type") != "char" or not isinstance(raw.get("chars"), str):
            raise ValueError("vocabulary is not a character vocabulary")
        return cls(raw["chars"])
