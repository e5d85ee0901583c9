"""From logits to tokens: a pure sampling function, and generation with or without the KV cache."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from minigpt_cli.config import UserError
from minigpt_cli.device import ThreadChoice, fast_float32_matmuls, make_generator, synchronize, use_threads
from minigpt_cli.inference import Decoder
from minigpt_cli.model import GPT
from minigpt_cli.tokenizer import CharTokenizer, UnknownCharactersError, describe_chars


@dataclass(frozen=True)
class SamplingSettings:
    # 0 means greedy (argmax).
    temperature: float = 0.8
    # None: off. Otherwise keep the k most likely tokens.
    top_k: int | None = None
    # 1.0: off. Keep the smallest set of tokens whose probabilities sum to at least top_p.
    top_p: float = 1.0
    # 0.0: off. Drop tokens whose probability is below min_p times the most likely token's.
    min_p: float = 0.0
    # 1.0: off. Divide positive (multiply negative) logits of tokens already in the window.
    repetition_penalty: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    def applied(self) -> tuple[list[str], list[str]]:
        """The rules that shape the distribution drawn from, as set ("top-k 10"), and those left off."""
        rules = [("temperature", "0 = greedy" if self.temperature == 0 else f"{self.temperature:g}", True),
                 ("top-k", f"{self.top_k}", self.top_k is not None), ("top-p", f"{self.top_p:g}", self.top_p < 1.0),
                 ("min-p", f"{self.min_p:g}", self.min_p > 0),
                 ("repetition penalty", f"{self.repetition_penalty:g}", self.repetition_penalty != 1.0)]
        return [f"{n} {v}" for n, v, on in rules if on], [n for n, _, on in rules if not on]


def check_settings(settings: SamplingSettings, vocab_size: int) -> SamplingSettings:
    """Reject out-of-range settings with the allowed range; clamp top_k to the vocabulary."""
    s = settings
    for flag, value in (("--temperature", s.temperature), ("--top-p", s.top_p), ("--min-p", s.min_p),
                        ("--repetition-penalty", s.repetition_penalty)):
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
    if not s.temperature >= 0:
        raise UserError(f"--temperature must be 0 (greedy) or positive, got {s.temperature}")
    if s.top_k is not None and s.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {s.top_k}")
    if not 0.0 < s.top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {s.top_p}")
    if not 0.0 <= s.min_p <= 1.0:
        raise UserError(f"--min-p must be in [0, 1], got {s.min_p}")
    if not 0.01 <= s.repetition_penalty <= 100:
        raise UserError(f"--repetition-penalty must be in [0.01, 100] (1 is off), got {s.repetition_penalty}")
    if s.top_k is not None and s.top_k > vocab_size:
        s = SamplingSettings(s.temperature, vocab_size, s.top_p, s.min_p, s.repetition_penalty)
    return s


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, vocab_size), history (B, L) token ids: the CTRL paper's penalty, once per distinct token."""
    score = logits.gather(1, history)
    score = torch.where(score > 0, score / penalty, score * penalty)
    return logits.scatter(1, history, score)


def _penalized(logits: torch.Tensor, settings: SamplingSettings, history: torch.Tensor | None) -> torch.Tensor:
    """logits (B, vocab_size) in float32, with the repetition penalty applied over history (B, L)."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    if settings.repetition_penalty != 1.0 and history is not None and history.numel():
        logits = apply_repetition_penalty(logits, history, settings.repetition_penalty)
    return logits


def _filtered_probs(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Temperature, top-k, min-p and top-p on penalized logits (B, vocab_size), temperature > 0: the
    probabilities drawn from, (B, vocab_size), each row summing to at most 1 (multinomial rescales)."""
    # Subtract the maximum first, so a tiny temperature cannot overflow to inf - inf = NaN.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / settings.temperature
    if settings.top_k is not None and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.min_p > 0:
        threshold = settings.min_p * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= settings.top_p * sorted_probs.sum(-1, keepdim=True)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
    return probs


def sampling_probs(logits: torch.Tensor, settings: SamplingSettings,
                   history: torch.Tensor | None = None) -> torch.Tensor:
    """What next_token draws from, (B, vocab_size), not yet rescaled to sum to 1 (multinomial's input).
    Temperature 0: all of it on the argmax."""
    logits = _penalized(logits, settings, history)
    if settings.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return _filtered_probs(logits, settings)


def draw(probs: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of sampling_probs (B, vocab_size); returns (B,) token ids."""
    if settings.temperature == 0:
        return probs.argmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def next_token(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None = None,
               history: torch.Tensor | None = None) -> torch.Tensor:
    """Choose one token per row of logits (B, vocab_size); returns (B,) token ids."""
    logits = _penalized(logits, settings, history)
    if settings.temperature == 0:
        return logits.argmax(dim=-1)  # no distribution needed: the cheap path of greedy decoding
    return draw(_filtered_probs(logits, settings), settings, generator)


@dataclass
class Weighing:
    """What the model weighed before a step: the distribution's most likely tokens, and the drawn one."""
    probs: torch.Tensor  # (B, K) the K highest probabilities of the distribution drawn from, highest first
    ids: torch.Tensor  # (B, K) their token ids
    chosen: torch.Tensor  # (B,) the probability of the token drawn


def weigh(probs: torch.Tensor, tokens: torch.Tensor, top: int) -> Weighing:
    """The top tokens of sampling_probs (B, vocab_size), rescaled to sum to 1, and the drawn tokens' share."""
    probs = probs / probs.sum(dim=-1, keepdim=True)
    values, ids = torch.topk(probs, min(top, probs.shape[-1]), dim=-1)  # (B, K) each
    return Weighing(values, ids, probs.gather(1, tokens[:, None]).squeeze(1))


@dataclass
class GenerationStep:
    tokens: torch.Tensor  # (B,) the token chosen for each sample
    active: torch.Tensor  # (B,) bool: the token belongs to its sample (the sample had not stopped)
    logits: torch.Tensor  # (B, vocab_size) the logits the token was chosen from
    # With generate(top=K): the distribution's K most likely tokens, and the drawn one's probability.
    weighing: Weighing | None = None


def slide_keep(block_size: int) -> int:
    """Positions kept when the window is full: 3/4 of it, so a refill happens every block_size/4 tokens."""
    return max(1, block_size - max(1, block_size // 4))


@torch.inference_mode()
def generate(model: GPT | Decoder, prompt: Sequence[int], max_new_tokens: int, settings: SamplingSettings,
             generator: torch.Generator | None = None, num_samples: int = 1, use_cache: bool = True,
             stop: Sequence[Sequence[int]] = (), top: int = 0) -> Iterator[GenerationStep]:
    """Yield one GenerationStep per new position for num_samples samples of the same prompt.

    The context window is the same with and without the cache: it grows to block_size, then keeps
    its last slide_keep(block_size) tokens. With the cache, the prompt is prefilled once (batch 1,
    shared by every sample) and each step feeds one token; a full window is prefilled again after
    the slide. Without it, every step runs the whole window, which is the reference the cached
    path matches. Generation stops early once every sample has ended with one of `stop`. `model`
    is a GPT or the Decoder built from one (which is called the same way). With top > 0 each step
    also carries the top tokens of the distribution its token was drawn from (the same draw: the
    text is the one top=0 gives); only then is the distribution kept and sorted.
    """
    block_size = model.config.block_size
    device = model.device
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    window = torch.tensor(list(prompt)[-block_size:], dtype=torch.long, device=device)[None]  # (1, T)
    keep = slide_keep(block_size)
    cache = model.new_kv_cache(num_samples) if use_cache else None
    logits = _last(model(window, cache))  # (1, vocab_size): one prefill for all samples
    logits = logits.expand(num_samples, -1)  # (B, vocab_size)
    window = window.expand(num_samples, -1)  # (B, T)
    # A cached step needs the window only when it slides (or for the repetition penalty), so its
    # new tokens wait in a list until then: fewer operations between steps.
    track_window = cache is None or settings.repetition_penalty != 1.0
    pending: list[torch.Tensor] = []  # (B, 1) tokens not yet in `window`
    active = torch.ones(num_samples, dtype=torch.bool, device=device)
    stops = [torch.tensor(list(s), dtype=torch.long, device=device) for s in stop if len(s)]
    generated = torch.empty(num_samples, 0, dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        history = window if settings.repetition_penalty != 1.0 else None
        tokens, weighing = _choose(logits, settings, generator, history, top)  # (B,), Weighing or None
        column = tokens.view(num_samples, 1)
        # `active` only changes where there are stop texts, so only then is a copy needed.
        yield GenerationStep(tokens, active.clone() if stops else active, logits, weighing)
        if stops:
            generated = torch.cat([generated, column], dim=1)[:, -max(len(s) for s in stops):]
            for s in stops:
                if generated.shape[1] >= len(s):
                    active &= ~(generated[:, -len(s):] == s).all(dim=1)
            if not active.any():
                return
        if track_window:
            window = torch.cat([window, column], dim=1)  # (B, T + 1)
        else:
            pending.append(column)
        if window.shape[1] + len(pending) > block_size:
            window = torch.cat([window, *pending], dim=1)[:, -keep:]
            pending.clear()
            if cache is not None:
                cache.reset()
                logits = _last(model(window, cache))
                continue
        if cache is not None:
            logits = _last(model(column, cache))
        else:
            logits = _last(model(window))


def _choose(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None,
            history: torch.Tensor | None, top: int) -> tuple[torch.Tensor, Weighing | None]:
    """next_token's choice; with top > 0, drawn from the distribution it also returns the top of."""
    if not top:
        return next_token(logits, settings, generator, history), None
    probs = sampling_probs(logits, settings, history)  # (B, vocab_size)
    tokens = draw(probs, settings, generator)  # (B,)
    return tokens, weigh(probs, tokens, top)


def _last(logits: torch.Tensor) -> torch.Tensor:
    """The last position's logits (B, vocab_size), in float32."""
    logits = logits[:, -1]
    return logits if logits.dtype == torch.float32 else logits.float()


# ---------------------------------------------------------------------------------------------
# A sampling session for the CLI: load a run, check the request, generate, decode, time it.
# ---------------------------------------------------------------------------------------------

@dataclass
class SampleRequest:
    run: Path | None
    prompt: str
    settings: SamplingSettings = SamplingSettings()
    max_new_tokens: int = 500
    num_samples: int = 1
    stop: Sequence[str] = ()
    seed: int | None = None
    use_cache: bool = True
    dtype: str = "float32"
    device: str = "auto"
    skip_unknown: bool = False
    compile: bool = False
    # CPU threads per operation; 0: chosen from the step's size and the CPUs free now (use_threads).
    threads: int = 0
    # 0: off. Otherwise, for each character of the first sample, the top most likely characters of
    # the distribution it was drawn from (SampleSession.stream_weighed).
    top: int = 0


@dataclass(frozen=True)
class WeighedChar:
    """One generated character and what the model weighed before it, after temperature and the filters."""
    char: str
    prob: float  # its probability in the distribution it was drawn from
    bits: float  # its surprisal, -log2 prob
    # The most likely characters and their probabilities, highest first: at most request.top of them,
    # fewer where the filters left fewer (temperature 0 leaves one).
    top: list[tuple[str, float]]

    def to_dict(self) -> dict:
        return {"char": self.char, "prob": self.prob, "bits": self.bits, "top": [[c, p] for c, p in self.top]}


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of text could still grow into a stop text (so must not be shown yet)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[-n:]):
                longest = n
                break
    return longest


class SampleSession:
    def __init__(self, request: SampleRequest, model: Decoder, tokenizer: CharTokenizer, prompt_ids: list[int],
                 settings: SamplingSettings, seed: int, checkpoint: Path, warnings: list[str], prompt: str,
                 threads: ThreadChoice | None = None):
        self.request = request
        self.threads = threads
        # The prompt as the model reads it (without characters dropped by --unknown skip): what is printed.
        self.prompt = prompt
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.settings = settings
        self.seed = seed
        self.checkpoint = checkpoint
        self.warnings = warnings
        self.samples: list[str] = []
        self.tokens_generated = 0
        self.seconds = 0.0
        self.first_token_seconds = math.nan
        self._weighed: list[WeighedChar] = []  # made but not yet shown (request.top only)

    def stream(self) -> Iterator[str]:
        """Generate every sample; yield the first sample's text as soon as it is safe to show."""
        req, device = self.request, self.model.device
        stops = [s for s in req.stop if s]
        stop_ids = [self.tokenizer.encode(s) for s in stops if not self.tokenizer.unknown(s)]
        texts = [[] for _ in range(req.num_samples)]
        shown = 0
        generator = make_generator(self.seed, device)
        synchronize(device)
        began = time.perf_counter()
        with fast_float32_matmuls(device):  # TF32 on CUDA, as training has
            for i, step in enumerate(generate(self.model, self.prompt_ids, req.max_new_tokens, self.settings, generator,
                                              req.num_samples, req.use_cache, stop_ids, req.top)):
                if i == 0:
                    self.first_token_seconds = time.perf_counter() - began
                tokens, active = step.tokens.tolist(), step.active.tolist()
                for row, (token, alive) in enumerate(zip(tokens, active)):
                    if alive:
                        texts[row].append(self.tokenizer.chars[token])
                        self.tokens_generated += 1
                if active[0] and step.weighing is not None:
                    self._weighed.append(self._weighed_char(step.weighing, tokens[0]))
                first = "".join(texts[0]) if active[0] else None
                if first is not None:
                    if any(first.endswith(s) for s in stops):
                        continue
                    safe = len(first) - _held_back(first, stops)
                    if safe > shown:
                        yield first[shown:safe]
                        shown = safe
        synchronize(device)
        self.seconds = time.perf_counter() - began
        self.samples = [self._strip_stop("".join(t), stops) for t in texts]
        if len(self.samples[0]) > shown:
            yield self.samples[0][shown:]

    def stream_weighed(self) -> Iterator[WeighedChar]:
        """With request.top: the first sample's characters as they are shown (stream's text, one
        character at a time), each with what the model weighed before drawing it."""
        for piece in self.stream():
            yield from self._weighed[:len(piece)]
            del self._weighed[:len(piece)]

    def _weighed_char(self, weighing: Weighing, token: int) -> WeighedChar:
        chars = self.tokenizer.chars
        prob = weighing.chosen[0].item()
        # Characters the filters removed (probability 0) are not among the likely ones, whatever K is.
        top = [(chars[i], p) for i, p in zip(weighing.ids[0].tolist(), weighing.probs[0].tolist()) if p > 0]
        return WeighedChar(chars[token], prob, max(0.0, -math.log2(prob)) if prob > 0 else math.inf, top)

    @staticmethod
    def _strip_stop(text: str, stops: Sequence[str]) -> str:
        for s in stops:
            if text.endswith(s):
                return text[: -len(s)]
        return text

    def result(self) -> dict:
        req = self.request
        return {
            "prompt": self.prompt,
            "samples": self.samples,
            "tokens_generated": self.tokens_generated,
            "tokens_per_second": self.tokens_generated / self.seconds if self.seconds else math.nan,
            "seconds": self.seconds,
            "time_to_first_token": self.first_token_seconds,
            "seed": self.seed,
            "settings": {**self.settings.to_dict(), "max_new_tokens": req.max_new_tokens,
                         "num_samples": req.num_samples, "stop": list(req.stop), "kv_cache": req.use_cache,
                         "dtype": req.dtype, "compile": req.compile, "top": req.top},
            "checkpoint": str(self.checkpoint),
            "device": str(self.model.device),
            "threads": self.threads.to_dict() if self.threads else None,
        }


def prepare(request: SampleRequest) -> SampleSession:
    """Load the run, check every setting, and encode the prompt; nothing is generated yet."""
    if request.top < 0:
        raise UserError(f"--top must be at least 1 (0 is off), got {request.top}")
    if request.top and request.num_samples != 1:
        raise UserError(f"--top shows what the model weighed for one sample; it cannot go with --num-samples "
                        f"{request.num_samples}")
    from minigpt_cli.checkpoint import load_checkpoint
    from minigpt_cli.device import DTYPES, check_compile, check_inference_dtype, resolve_device

    device = resolve_device(request.device).device
    check_inference_dtype(request.dtype, device)
    if request.compile and not request.use_cache:
        raise UserError("--compile compiles the KV-cached decode step; it cannot go with --no-kv-cache")
    if request.compile:
        check_compile(device)
    loaded = load_checkpoint(request.run, which="best")
    tokenizer = loaded.tokenizer
    settings = check_settings(request.settings, tokenizer.vocab_size)
    warnings = []
    prompt = request.prompt
    missing = tokenizer.unknown(prompt)
    if missing:
        if not request.skip_unknown:
            raise UnknownCharactersError(missing, "the prompt")
        prompt = "".join(c for c in prompt if c in tokenizer.stoi)
        warnings.append(f"dropped {len(missing)} character(s) not in the vocabulary: {describe_chars(missing)}")
    for s in request.stop:
        if tokenizer.unknown(s):
            warnings.append(f"stop text {s!r} has characters outside the vocabulary, so it can never occur")
    shown = prompt
    if not prompt:
        # Training text starts lines after a newline, so an empty prompt starts there too.
        prompt = "\n" if "\n" in tokenizer.stoi else tokenizer.chars[0]
    block_size = loaded.config.model.block_size
    if len(prompt) > block_size:
        warnings.append(f"the prompt has {len(prompt)} characters; the model sees its last {block_size} (block_size)")
    if request.compile and device.type == "cpu":
        warnings.append("--compile is meant for GPUs: on a CPU the compiled step is slower than the default "
                        "one (oneDNN's packed matrices cannot be compiled)")
    model = loaded.build_model(device)
    # A decode step reads every weight once per sample: that is the work its threads share.
    threads = use_threads(model.num_parameters() * request.num_samples, request.threads, device=device)
    model = Decoder(model, DTYPES[request.dtype], compile=request.compile)
    seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
    return SampleSession(request, model, tokenizer, tokenizer.encode(prompt), settings, seed, loaded.path, warnings,
                         shown, threads)
