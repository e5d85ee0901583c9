"""minigpt sample: check the options, prepare a sampling session, stream or print its text."""

from __future__ import annotations

import sys
from typing import Annotated, Callable, List, Optional

import typer

from minigpt_cli.config import UserError
from minigpt_cli.options import AUTO_DEVICE, Device, Dtype, JsonOut, RunDir, Threads
from minigpt_cli.output import emit_json, visible, warn

EXAMPLES = ("Examples:\n\n  minigpt sample --prompt \"ROMEO:\"\n\n"
            "  minigpt sample runs/default-20261124-101500 --temperature 0 --max-new-tokens 200\n\n"
            "  echo \"JULIET:\" | minigpt sample --prompt - --json")
SAMPLE_SEPARATOR = "-----"
# Text that cannot be streamed (several samples, --json, --no-stream) is held until the end: bounded.
HELD_TEXT_MAX_CHARS = 10_000_000


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
    json_out: JsonOut = False,
) -> None:
    """Generate text from a trained run (prints the prompt, then its continuation)."""
    from minigpt_cli import sampler

    _check(max_new_tokens, num_samples, seed, stop, unknown)
    text = _read_prompt(prompt)
    # One sample streams wherever stdout goes (a terminal, a pipe, a file), so a reader that has had
    # enough (`| head`) ends the command; several samples, or JSON, are printed whole at the end.
    streaming = stream is not False and not json_out and num_samples == 1
    if not streaming:
        _check_held(max_new_tokens, num_samples)
    session = sampler.prepare(sampler.SampleRequest(
        run=run, prompt=text, settings=sampler.SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty),
        max_new_tokens=max_new_tokens, num_samples=num_samples, stop=stop, seed=seed, use_cache=not no_kv_cache,
        dtype=dtype, device=device or AUTO_DEVICE, skip_unknown=unknown == "skip", compile=compile_step,
        threads=threads))
    for warning in session.warnings:
        warn(warning)
    if streaming:
        _write_streamed(session.prompt, session.stream())  # the prompt without what --unknown skip dropped
    else:
        _write_whole(session, json_out)


def _check_held(max_new_tokens: int, num_samples: int) -> None:
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
