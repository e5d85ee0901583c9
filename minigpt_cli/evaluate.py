"""How well a trained run predicts a text: NLL per character, bits per character, perplexity."""

from __future__ import annotations

import dataclasses
import math
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from minigpt_cli.checkpoint import LoadedCheckpoint, load_checkpoint, run_text
from minigpt_cli.config import UserError, best_measure
from minigpt_cli.corpus import load_corpus
from minigpt_cli.device import (DTYPES, Precision, autocast, check_inference_dtype, choose_precision,
                                fast_float32_matmuls, resolve_device, use_threads)
from minigpt_cli.model import GPT
from minigpt_cli.progress import ProgressCallback, progress_task
from minigpt_cli.scoring import bits_per_char, score_text



@dataclass
class EvalRequest:
    run: Path | None = None
    # None: the run's own validation split; "-": stdin; otherwise a file or a folder of .txt files.
    data: str | None = None
    # None: block_size // 2, so every character after the first window sees at least half a window of context.
    stride: int | None = None
    batch_size: int = 32
    device: str = "auto"
    dtype: str = "float32"
    which: str = "best"
    # CPU threads per operation; 0: the CPUs other programs leave free now (use_threads).
    threads: int = 0
    # Score at most about this many characters (a fixed sample of windows past it); 0: all of them;
    # None: the run's train.eval_max_chars.
    max_chars: int | None = None
    progress: ProgressCallback | None = None


@dataclass
class EvalResult:
    nll: float  # mean negative log-likelihood per scored character, in nats
    bpc: float  # the same in bits
    perplexity: float  # exp(nll)
    chars_scored: int
    text_chars: int
    sampled: bool  # a fixed sample of windows, not the whole text (see max_chars)
    max_chars: int
    source: str
    stride: int
    block_size: int
    min_context: int  # context every character after the first window has, at least
    batch_size: int
    checkpoint: str
    step: int
    checkpoint_val_loss: float | None  # what training measured on its validation split, for comparison
    device: str
    precision: str
    seconds: float
    chars_per_second: float
    warnings: list[str] = field(default_factory=list)
    threads: dict | None = None  # ThreadChoice.to_dict(): the thread count and why
    # How training measured checkpoint_val_loss: "final evaluation" (non-overlapping windows of the split)
    # or a periodic evaluation's measure ("20 sampled batches"), not to be read as this result's equal.
    checkpoint_val_measure: str | None = None
    # What a model that knows nothing scores: a uniform guess over the vocabulary, ln(V) nats, log2(V) bits.
    vocab_size: int = 0
    uniform_nll: float = math.nan
    uniform_bpc: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def score(model: GPT, ids: np.ndarray, stride: int, batch_size: int, device: torch.device,
          precision: Precision, max_chars: int = 0, progress: ProgressCallback | None = None) -> tuple[float, int]:
    """Mean -log p (nats) over every character after the first (or a fixed sample of windows past
    max_chars), and how many characters that is."""
    total, count = score_text(model, ids, model.config.block_size, stride, batch_size, device, precision,
                              progress, "evaluation", max_chars)
    return total / max(count, 1), count


def _val_measure(loaded: LoadedCheckpoint) -> str:
    """How training measured the val_loss a checkpoint records: its final evaluation, or a periodic one."""
    t = loaded.config.train
    if loaded.meta.get("final") is True:
        stride, block = t.eval_stride, loaded.config.model.block_size
        if stride and stride != block:  # train.eval_stride: overlapping windows, like eval's --stride
            return f"final evaluation, windows of {block} every {stride}"
        return "final evaluation"
    return best_measure(t.eval_full, t.eval_iters)


def _validation_ids(loaded: LoadedCheckpoint, warnings: list[str]) -> tuple[np.ndarray, str]:
    """The run's validation split, rebuilt from its data path with its own vocabulary."""
    data = loaded.config.data
    copy = run_text(loaded.run_dir)
    if data.path and copy is not None:
        data = dataclasses.replace(data, path=str(copy))  # the text the run was trained on, kept in the run
    if data.path == "-":
        raise UserError("this run was trained on text from stdin, so its validation split cannot be read "
                        "again; pass the text with --data PATH (or --data - to pipe it in)")
    corpus = load_corpus(data.path or None, data.val_fraction, loaded.tokenizer)
    trained_on = loaded.meta.get("data_fingerprint")
    if trained_on and trained_on != corpus.fingerprint:
        warnings.append(f"{corpus.source} has changed since this run was trained on it (fingerprint "
                        f"{corpus.fingerprint[:12]}, trained on {trained_on[:12]}); scoring its current "
                        f"last {data.val_fraction:.0%}")
    return corpus.val, f"validation split of {corpus.source} (last {data.val_fraction:.0%})"


def _text_ids(loaded: LoadedCheckpoint, path: str) -> tuple[np.ndarray, str]:
    """The whole text encoded with the run's vocabulary, through the cache (a memory map)."""
    corpus = load_corpus(path, 0.0, loaded.tokenizer)
    return corpus.train, corpus.source


def _load_for_scoring(request: Any) -> tuple[torch.device, LoadedCheckpoint, Precision]:
    """The device, the checkpoint and the precision a scoring request runs in: with dtype auto, the
    precision the run was trained in (bfloat16 autocast on most CUDA GPUs, float32 elsewhere)."""
    device = resolve_device(request.device).device
    check_inference_dtype(request.dtype, device, ("auto", *DTYPES))
    loaded = load_checkpoint(request.run, which=request.which)
    precision = choose_precision(device, loaded.config.train.dtype if request.dtype == "auto" else request.dtype,
                                 training=False)
    return device, loaded, precision


def evaluate(request: EvalRequest) -> EvalResult:
    if request.which not in ("best", "latest"):
        raise UserError(f"--checkpoint must be best or latest, got {request.which!r}")
    if request.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {request.batch_size}")
    if request.max_chars is not None and request.max_chars < 0:
        raise UserError(f"--max-chars must be 0 (score everything) or positive, got {request.max_chars}")
    device, loaded, precision = _load_for_scoring(request)
    block_size = loaded.config.model.block_size
    stride = request.stride if request.stride is not None else max(1, block_size // 2)
    if not 1 <= stride <= block_size:
        raise UserError(f"--stride must be between 1 and block_size ({block_size}), got {stride}")
    warnings: list[str] = []
    if request.data is None:
        ids, source = _validation_ids(loaded, warnings)
    else:
        ids, source = _text_ids(loaded, request.data)
    if len(ids) < 2:
        raise UserError(f"{source} has {len(ids)} character(s); at least 2 are needed (the first is only context)")
    model = loaded.build_model(device)
    # Each batch reads every weight once per position scored.
    threads = use_threads(model.num_parameters() * request.batch_size * block_size, request.threads, device=device)
    max_chars = loaded.config.train.eval_max_chars if request.max_chars is None else request.max_chars
    began = time.perf_counter()
    with fast_float32_matmuls(device):  # TF32 on CUDA, as training's evaluations have
        nll, count = score(model, ids, stride, request.batch_size, device, precision, max_chars, request.progress)
    seconds = time.perf_counter() - began
    val_loss = loaded.meta.get("val_loss")
    # math.exp overflows a float past about 709: such a perplexity is reported as infinite.
    return EvalResult(
        nll=nll, bpc=bits_per_char(nll), perplexity=math.exp(nll) if nll < 709 else math.inf, chars_scored=count,
        text_chars=len(ids), sampled=count < len(ids) - 1, max_chars=max_chars, source=source,
        stride=stride, block_size=block_size, min_context=block_size - stride, batch_size=request.batch_size,
        checkpoint=str(loaded.path), step=loaded.step,
        checkpoint_val_loss=float(val_loss) if val_loss is not None else None,
        checkpoint_val_measure=_val_measure(loaded) if val_loss is not None else None,
        device=str(device), precision=precision.name, seconds=seconds,
        chars_per_second=count / seconds if seconds > 0 else math.nan, warnings=warnings,
        threads=threads.to_dict() if threads else None,
        vocab_size=model.vocab_size, uniform_nll=math.log(model.vocab_size), uniform_bpc=math.log2(model.vocab_size))


# ---------------------------------------------------------------------------------------------
# Surprisal per character: what the model finds hard (eval --show)
# ---------------------------------------------------------------------------------------------

# --show scores at most this many characters unless told otherwise (--limit): enough to read on a screen.
SHOW_CHARS = 1000
# --show --limit 0 records every character of the text: at most this many.
SHOW_MAX_CHARS = 10_000_000
# The classes of character eval --show sums surprisal over, in the order shown.
CHAR_CLASSES = ("letters", "capitals", "digits", "punctuation", "spaces", "newlines", "other")


def char_class(c: str) -> str:
    """Which of CHAR_CLASSES c is in: lowercase letters, capitals, digits, punctuation (Unicode's
    punctuation and symbols, so $ + < = > ^ ` | ~ too), spaces (any whitespace but a newline), newlines."""
    if c == "\n":
        return "newlines"
    if c.isspace():
        return "spaces"
    if c.isdigit():
        return "digits"
    if c.isalpha() and c.islower():
        return "letters"
    if c.isalpha() and c.isupper():
        return "capitals"
    if unicodedata.category(c)[0] in "PS":
        return "punctuation"
    return "other"


def surprisal_by_class(text: str, bits: list[float | None]) -> list[dict[str, Any]]:
    """For each class of CHAR_CLASSES, over the scored characters: how many, their share of the
    characters, their mean surprisal in bits, and their share of all the bits (the shares each sum to
    1, and the mean of the class means weighted by characters is the overall mean)."""
    totals = {name: [0, 0.0] for name in CHAR_CLASSES}  # characters, summed bits
    for c, b in zip(text, bits):
        if b is not None:
            entry = totals[char_class(c)]
            entry[0] += 1
            entry[1] += b
    chars = sum(n for n, _ in totals.values())
    all_bits = math.fsum(b for _, b in totals.values())
    return [{"class": name, "chars": n, "share_chars": n / chars if chars else None,
             "mean_bits": total / n if n else None, "share_bits": total / all_bits if all_bits > 0 else None}
            for name, (n, total) in totals.items()]


@dataclass
class SurprisalResult:
    text: str
    # -log2 p(character | the characters before it in its window), in bits; None for the first
    # character, which nothing predicts.
    bits: list[float | None]
    context: list[int]  # characters of context each one had
    source: str
    text_chars: int  # of the whole text, of which the first len(text) are shown
    block_size: int
    vocab_size: int
    uniform_bits: float
    checkpoint: str
    step: int
    limit: int = SHOW_CHARS  # the characters asked for; 0: all of them

    def to_dict(self) -> dict[str, Any]:
        scored = [b for b in self.bits if b is not None]
        return {
            "source": self.source, "text_chars": self.text_chars, "shown_chars": len(self.text), "limit": self.limit,
            "block_size": self.block_size, "vocab_size": self.vocab_size, "uniform_bits": self.uniform_bits,
            "mean_bits": math.fsum(scored) / len(scored) if scored else None,
            "checkpoint": self.checkpoint, "step": self.step,
            "classes": surprisal_by_class(self.text, self.bits),
            "chars": [{"char": c, "bits": b, "context": n} for c, b, n in zip(self.text, self.bits, self.context)],
        }


def surprisal(request: EvalRequest, limit: int = SHOW_CHARS) -> SurprisalResult:
    """Each character's surprisal -log2 p in the first `limit` characters of the text (0: all of it),
    scored as training sees text: non-overlapping windows of block_size, so the first characters of
    each window have almost no context (and stand out), as do characters the model rarely saw."""
    if request.which not in ("best", "latest"):
        raise UserError(f"--checkpoint must be best or latest, got {request.which!r}")
    if request.stride is not None:
        raise UserError("--stride does not apply to --show, which scores non-overlapping windows of block_size "
                        "as training does")
    if limit < 0:
        raise UserError(f"--limit must be 0 (the whole text) or positive, got {limit}")
    if request.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {request.batch_size}")
    device, loaded, precision = _load_for_scoring(request)
    if request.data is None:
        ids, source = _validation_ids(loaded, [])
    else:
        ids, source = _text_ids(loaded, request.data)
    if len(ids) < 2:
        raise UserError(f"{source} has {len(ids)} character(s); at least 2 are needed (the first is only context)")
    if limit == 0 and len(ids) > SHOW_MAX_CHARS:
        raise UserError(f"{source} has {len(ids):,} characters; --show --limit 0 records every one, at most "
                        f"{SHOW_MAX_CHARS:,} (pass --limit N for the first N)")
    shown = np.asarray(ids[:limit or len(ids)]).astype(np.int64)
    block_size = loaded.config.model.block_size
    model = loaded.build_model(device).eval()
    use_threads(model.num_parameters() * block_size * request.batch_size, request.threads, device=device)
    bits, context = _window_surprisal(model, shown, block_size, request.batch_size, device, precision,
                                      request.progress)
    return SurprisalResult(
        text=loaded.tokenizer.decode(shown.tolist()), bits=bits, context=context, source=source,
        text_chars=len(ids), block_size=block_size, vocab_size=loaded.tokenizer.vocab_size,
        uniform_bits=math.log2(loaded.tokenizer.vocab_size), checkpoint=str(loaded.path), step=loaded.step,
        limit=limit)


def _window_surprisal(model: GPT, ids: np.ndarray, block_size: int, batch_size: int, device: torch.device,
                      precision: Precision, progress: ProgressCallback | None) -> tuple[list, list[int]]:
    """Surprisal in bits of every character of ids after the first (None for the first), in
    non-overlapping windows of block_size scored batch_size at a time, and each one's context."""
    bits: list[float | None] = [None]
    context = [0]
    data = torch.from_numpy(ids)
    full = (len(ids) - 1) // block_size  # windows of a whole block_size; one shorter one may follow
    begins = [*range(0, len(ids) - 1, block_size)]
    groups = [begins[i:min(i + batch_size, full)] for i in range(0, full, batch_size)] + [[b] for b in begins[full:]]
    with torch.no_grad(), autocast(device, precision), \
            progress_task(progress, "surprisal", total=len(ids) - 1, unit="chars") as report:
        for group in groups:
            length = min(block_size, len(ids) - 1 - group[0])
            xy = torch.stack([data[b:b + length + 1] for b in group]).to(device)  # (B, T + 1)
            logits = model(xy[:, :-1]).float()  # (B, T, vocab_size)
            nll = F.cross_entropy(logits.transpose(1, 2), xy[:, 1:], reduction="none")  # (B, T) nats
            bits += [bits_per_char(n) for n in nll.flatten().tolist()]
            context += [*range(1, length + 1)] * len(group)
            report.advance(length * len(group))
    return bits, context
