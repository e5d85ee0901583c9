"""minigpt sample: check the options, prepare a sampling session, stream or print its text."""

from __future__ import annotations

import sys
import textwrap
from typing import Annotated, Callable, List, Optional

import typer

from minigpt_cli.config import UserError
from minigpt_cli.options import AUTO_DEVICE, Device, Dtype, JsonOut, RunDir, Threads
from minigpt_cli.output import emit_json, visible, warn
from minigpt_cli.tokenizer import SHOWN_AS

EXAMPLES = ("Examples:\n\n  minigpt sample --prompt \"ROMEO:\"\n\n"
            "  minigpt sample runs/default-20261124-101500 --temperature 0 --max-new-tokens 200\n\n"
            "  echo \"JULIET:\" | minigpt sample --prompt - --json\n\n"
            "  minigpt sample --prompt \"ROMEO:\" --top 5 --max-new-tokens 20")
SAMPLE_SEPARATOR = "-----"
# Text that cannot be streamed (several samples, --json, --no-stream) is held until the end: bounded.
HELD_TEXT_MAX_CHARS = 10_000_000
# --top --json holds every step's top list until the end: at most this many (character, probability) pairs.
HELD_WEIGHED_MAX = 2_000_000
WIDTH = 80  # --top's lines are wrapped to this many columns


def sample(
    run: RunDir = None,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", help="Text to continue, or - for stdin (default: a newline).")] = None,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", "-n", help="Characters to generate per sample.")] = 500,
    temperature: Annotated[float, typer.Option(
        "--temperature", "-t", help="Softness of sampling; 0 is greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(
        "--top-k", help="Sample from the k most likely characters (default: off).")] = None,
    top_p: Annotated[float, typer.Option(
        "--top-p", help="Nucleus sampling: smallest set with this much probability (default: 1, off).")] = 1.0,
    min_p: Annotated[float, typer.Option(
        "--min-p", help="Drop characters below this fraction of the top one's probability (default: 0, "
                        "off).")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(
        "--repetition-penalty", help="Penalise characters already in the context; 1 is off.")] = 1.0,
    num_samples: Annotated[int, typer.Option("--num-samples", help="Samples generated together from one prefill.")] = 1,
    stop: Annotated[List[str], typer.Option(
        "--stop", help="End a sample when its text ends with this (repeatable; the stop text is not "
                       "printed).")] = [],
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="Random seed (default: a fresh one, shown with --json).")] = None,
    no_kv_cache: Annotated[bool, typer.Option(
        "--no-kv-cache", help="Recompute the whole window every step (slow; the reference).")] = False,
    dtype: Dtype = "float32",
    device: Device = None,
    compile_step: Annotated[bool, typer.Option(
        "--compile", help="Compile the decode step with torch.compile (CUDA graphs on a GPU); the first "
                          "characters wait for the compiler.")] = False,
    unknown: Annotated[str, typer.Option(
        "--unknown", help="Prompt characters outside the vocabulary: error or skip.")] = "error",
    stream: Annotated[Optional[bool], typer.Option(
        "--stream/--no-stream", help="Print text as it is made (default: on, for one sample without "
                                     "--json).")] = None,
    threads: Threads = 0,
    top: Annotated[int, typer.Option(
        "--top", help="Show, for each character made, the K most likely ones and their probabilities after "
                      "temperature and the filters, and the drawn one's surprisal (one sample).")] = 0,
    json_out: JsonOut = False,
) -> None:
    """Generate text from a trained run (prints the prompt, then its continuation)."""
    _check(max_new_tokens, num_samples, seed, stop, unknown)
    text = _read_prompt(prompt)
    from minigpt_cli import sampler  # torch (seconds): after the options are checked
    # One sample streams wherever stdout goes (a terminal, a pipe, a file), so a reader that has had
    # enough (`| head`) ends the command; several samples, or JSON, are printed whole at the end.
    streaming = stream is not False and not json_out and num_samples == 1
    if not streaming:
        _check_held(max_new_tokens, num_samples, top if json_out else 0)
    session = sampler.prepare(sampler.SampleRequest(
        run=run, prompt=text, settings=sampler.SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty),
        max_new_tokens=max_new_tokens, num_samples=num_samples, stop=stop, seed=seed, use_cache=not no_kv_cache,
        dtype=dtype, device=device or AUTO_DEVICE, skip_unknown=unknown == "skip", compile=compile_step,
        threads=threads, top=top))
    for warning in session.warnings:
        warn(warning)
    _write(session, streaming, json_out)


def _write(session, streaming: bool, json_out: bool) -> None:
    if session.request.top:
        _write_weighed(session, json_out)
    elif streaming:
        _write_streamed(session.prompt, session.stream())  # the prompt without what --unknown skip dropped
    else:
        _write_whole(session, json_out)


def _check_held(max_new_tokens: int, num_samples: int, top: int) -> None:
    if top and max_new_tokens * (top + 1) > HELD_WEIGHED_MAX:
        raise UserError(f"--top {top} --json for {max_new_tokens:,} characters is more than is held to print at the "
                        f"end (at most {HELD_WEIGHED_MAX:,} characters and probabilities); without --json it streams")
    if max_new_tokens * num_samples > HELD_TEXT_MAX_CHARS:
        raise UserError(f"--max-new-tokens {max_new_tokens:,} x --num-samples {num_samples} is more text than is held "
                        f"to print at the end (at most {HELD_TEXT_MAX_CHARS:,} characters); a single sample without "
                        f"--json or --no-stream streams any length")


def _write_whole(session, json_out: bool) -> None:
    """Every sample at the end: one JSON object, or each sample after the prompt, separated."""
    for _ in session.stream():
        pass
    result = session.result()
    if json_out:
        emit_json(result)
        return
    show = _shown()
    for i, continuation in enumerate(result["samples"]):
        if i:
            sys.stdout.write(f"{SAMPLE_SEPARATOR}\n")
        sys.stdout.write(show(session.prompt + continuation) + "\n")
    sys.stdout.flush()


def _shown() -> Callable[[str], str]:
    """Text as it goes to stdout: made visible on a terminal (a model trained on text with escape
    sequences writes them too), exactly as made into a pipe or a file."""
    return visible if sys.stdout.isatty() else str


def _check(max_new_tokens: int, num_samples: int, seed: Optional[int], stop: List[str], unknown: str) -> None:
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be zero or positive, got {max_new_tokens}")
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    if seed is not None and not 0 <= seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63), got {seed}")
    if any(s == "" for s in stop):
        raise UserError("--stop needs a non-empty text (an empty one would end every sample at once)")
    if unknown not in ("error", "skip"):
        raise UserError(f"--unknown must be error or skip, got {unknown!r}")


def _read_prompt(prompt: Optional[str]) -> str:
    if prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("--prompt - reads the prompt from stdin, but stdin is a terminal (pipe text in)")
        raw = sys.stdin.buffer.read()
        try:
            return raw.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark, as files have theirs dropped
        except UnicodeDecodeError as exc:
            raise UserError(f"prompt from stdin is not valid UTF-8: byte at offset {exc.start}") from None
    return prompt or ""


def _write_streamed(prompt: str, pieces) -> None:
    """Each piece as soon as it is made, so a reader sees the text grow (and can stop it)."""
    show = _shown()
    sys.stdout.write(show(prompt))
    sys.stdout.flush()
    for piece in pieces:
        sys.stdout.write(show(piece))
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _write_weighed(session, json_out: bool) -> None:
    """--top: a line per character, as it is made, with what the model weighed; or one JSON object."""
    if json_out:
        steps = [w.to_dict() for w in session.stream_weighed()]
        emit_json({**session.result(), "steps": steps})
        return
    applied, off = session.settings.applied()
    header = (f"what the model weighed before each character: the {session.request.top} most likely next "
              f"characters and their probabilities after {', '.join(applied)}"
              + (f" (off: {', '.join(off)})" if off else "")
              + "; first, the character drawn, its probability and its surprisal -log2 p in bits")
    sys.stdout.write(textwrap.fill(header, WIDTH) + "\n")
    sys.stdout.write(textwrap.fill(f"prompt: {_quoted(session.prompt)}", WIDTH) + "\n")
    for weighed in session.stream_weighed():
        sys.stdout.write(_weighed_line(weighed) + "\n")
        sys.stdout.flush()
    sys.stdout.write("\n" + visible(session.prompt + session.samples[0]) + "\n")
    sys.stdout.flush()


def _weighed_line(weighed) -> str:
    """'R' 0.412 ( 1.28 bits)  top: 'R' 0.41  'M' 0.12 ..., wrapped under the first entry."""
    from rich.cells import cell_len

    head = f"{_quoted(weighed.char)} {_prob(weighed.prob, 3)} ({weighed.bits:5.2f} bits)  top:"
    indent = " " * (cell_len(head) + 1)
    lines, line = [], head
    for c, p in weighed.top:
        entry = f"{_quoted(c)} {_prob(p, 2)}"
        gap = " " if line == head else "  "
        if line not in (head, indent) and cell_len(line) + len(gap) + cell_len(entry) > WIDTH:
            lines.append(line)
            line, gap = indent, ""
        line += gap + entry
    return "\n".join([*lines, line])


def _quoted(text: str) -> str:
    """Text in quotes with every character visible: newline, space and tab as one sign each; in double
    quotes where it holds a single one and no double one, as Python's repr does."""
    shown = "".join(SHOWN_AS.get(c) or visible(c) for c in text)
    quote = '"' if "'" in shown and '"' not in shown else "'"
    return quote + shown + quote


def _prob(p: float, digits: int) -> str:
    """A probability to `digits` places, or in scientific notation when it would read as zero."""
    return f"{p:.{digits}f}" if p == 0 or p >= 10 ** -digits else f"{p:.0e}"
