"""minigpt bench: measure a run or config (training, sampling, attention), then tables of the timings."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from minigpt_cli.config import UserError
from minigpt_cli.options import AUTO_DEVICE, Device, Dtype, JsonOut, Overrides, Quiet, Target, Threads, VocabSize
from minigpt_cli.output import (count, emit_json, err, key_value_table, mib, ms, out, si, titled_table,
                                vocab_source)
from minigpt_cli.views import ProgressLine

EXAMPLES = ("Examples:\n\n  minigpt bench\n\n  minigpt bench gpt2_small --quick\n\n"
            "  minigpt bench runs/default-20261124-101500 --device cuda --json")
SECTIONS = ("train", "sample", "attention")


def bench(
    target: Target = None,
    device: Device = None,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer repeats and smaller work per measurement.")] = False,
    repeats: Annotated[Optional[int], typer.Option(
        "--repeats", help="Timed repeats per measurement (default: 10, or 3 with --quick).")] = None,
    max_seq: Annotated[int, typer.Option(
        "--max-seq", help="Longest sequence of the attention sweep (64, 128, ... doubling) and longest context "
                          "of the decode table.")] = 1024,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Training batch (default: the config's, reduced on CPU to bound the time).")] = None,
    seq_len: Annotated[Optional[int], typer.Option(
        "--seq-len", help="Training sequence length (default: block_size, reduced on CPU to bound the "
                          "time).")] = None,
    batch_sizes: Annotated[Optional[str], typer.Option(
        "--batch-sizes", help="Batches for decode throughput, e.g. 1,8,32 (default: 1,4,16,64; 1,4 quick).")] = None,
    only: Annotated[Optional[str], typer.Option(
        "--only", help="Sections to run, comma-separated: train, sample, attention (default: all).")] = None,
    dtype: Dtype = "float32",
    set_: Overrides = [],
    threads: Threads = 0,
    vocab_size: VocabSize = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Measure training and sampling speed, attention cost against length, and peak memory."""
    progress = ProgressLine(quiet)  # at once: loading PyTorch takes a moment
    try:
        from minigpt_cli.bench import BenchOptions
        from minigpt_cli.bench import bench as run_bench
        from minigpt_cli.targets import resolve_target

        sections = tuple(s.strip() for s in only.split(",") if s.strip()) if only else SECTIONS
        options = BenchOptions(device=device or AUTO_DEVICE, quick=quick, repeats=repeats, max_seq=max_seq,
                               batch_size=batch_size, seq_len=seq_len,
                               batch_sizes=_comma_ints(batch_sizes, "--batch-sizes"), sections=sections, dtype=dtype,
                               threads=threads)
        result = run_bench(resolve_target(target, set_, vocab_size=vocab_size), options, progress)
    finally:
        progress.close()
    if json_out:
        emit_json(result)
        return
    _render(result)


def _comma_ints(text: Optional[str], option: str) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option} expects numbers separated by commas, e.g. 1,4,16; got {text!r}") from None
    if not values:
        raise UserError(f"{option} expects at least one number, got {text!r}")
    return values


def _render(result: dict) -> None:
    model = result["model"]
    out.print(f"[bold]bench[/] {result['target']['kind']} {result['target']['name']}: "
              f"{count(model['n_params'])} parameters, {model['n_layer']} layers x {model['n_embd']}, "
              f"block_size {model['block_size']}, vocabulary {model['vocab_size']} "
              f"({vocab_source(result['target'])})")
    choice = result.get("thread_choice") or {}
    threads = (", ".join(f"{section} {c['threads']}" for section, c in choice.items()) + " threads"
               if choice else f"{result['threads']} threads")
    out.print(f"on {result['device']} ({result['device_name']}), {threads}, "
              f"torch {result['torch_version']}; times are medians ± median absolute deviation of "
              f"repeated, synchronised runs after warm-up", markup=False)
    out.print(f"FLOPs counted as {result['flops_convention']}", markup=False)
    if result.get("train"):
        _render_train(result["train"])
    if result.get("sample"):
        _render_sample(result["sample"])
    attention = result.get("attention")
    if attention and attention["rows"]:
        _render_attention(attention)
    memory = result["memory"]
    out.print(f"\npeak memory: {mib(memory['peak_bytes'])} ({memory['method']}); bench took "
              f"{result['seconds']:.1f}s", markup=False)
    for note in result["notes"]:
        err.print(f"note: {note}", markup=False)


def _render_train(train: dict) -> None:
    if "skipped" in train:
        out.print(f"\n[bold]training[/]: {train['skipped']}")
        return
    rows = [
        ("batch", f"{train['batch_size']} x {train['seq_len']} tokens, {train['precision']}, "
                  f"{train['optimizer']} (forward, backward, clip, step)"),
        ("time per iteration", ms(train["ms_per_iter"])),
        ("tokens per second", f"{train['tokens_per_sec']:,.0f}"),
        ("achieved", f"{train['achieved_gflops']:,.1f} GFLOP/s (model FLOPs per token x tokens / time)"),
    ]
    if train.get("mfu") is not None:
        rows.append(("MFU", f"{100 * train['mfu']:.1f}% of {train['peak_tflops']:g} TFLOP/s ({train['peak_source']})"))
    else:
        rows.append(("MFU", train["peak_source"]))
    if train.get("peak_memory_bytes"):
        rows.append(("peak memory", mib(train["peak_memory_bytes"])))
    out.print()
    out.print(key_value_table("training", rows))


def _render_sample(sample: dict) -> None:
    floor = sample["weight_floor"]
    out.print()
    out.print(key_value_table(f"sampling (batch 1, {sample['dtype']} weights, as minigpt sample runs)", [
        ("time to first token", f"{ms(sample['time_to_first_token_ms'])} (prefill of {sample['prompt_len']} "
                                f"tokens + choosing one)"),
        ("prefill", f"{sample['prefill_tokens_per_sec']:,.0f} tokens/s"),
        ("weight-read floor", f"{floor['ms']:.3g} ms: {floor['matrices']} matrix-vector products reading "
                              f"{mib(floor['bytes'])} ({floor['gb_per_s']:.1f} GB/s, "
                              f"{'oneDNN packed' if floor['kernel'] == 'model' else 'F.linear'})"),
    ]))
    _render_decode(sample["decode"])
    out.print(f"cost: {sample['cost']}", markup=False)
    if sample.get("past_block_size"):
        out.print(f"* {sample['past_block_size']}", markup=False)
    if sample["batch"]:
        table = titled_table(f"batched decode (KV cache, context {sample['batch'][0]['context']})",
                             ["batch", "step", "tokens/s"])
        for row in sample["batch"]:
            table.add_row(str(row["batch_size"]), ms(row["step_ms"]), f"{row['tokens_per_sec']:,.0f}")
        out.print(table)


def _render_decode(rows: list[dict]) -> None:
    """Two tables over the same contexts (one would not fit 80 columns): the FLOPs, then the times."""
    flops = titled_table("FLOPs of one decode step at a context length L: with the KV cache (the weights once, "
                         "attention of one query over L + 1 keys) and without it (all L + 1 positions)",
                         ["context", "weights", "attention", "KV cache step", "no cache step"])
    times = titled_table("decode step at a context length, with the KV cache and without it (recomputing the "
                         "whole prefix)", ["context", "KV cache", "no cache", "cache speed-up", "floor reached"])
    for row in rows:
        context = f"{row['context']}*" if row.get("past_block_size") else str(row["context"])
        flops.add_row(context, si(row["weights_flops"]), si(row["cached_attention_flops"]),
                      si(row["cached_flops"]), si(row["uncached_flops"]))
        times.add_row(context + _mark(row), ms(row["cached_ms"]), ms(row.get("uncached_ms")),
                      f"{row['cache_speedup']:.1f}x" if row.get("cache_speedup") else "-",
                      f"{row['floor_pct']:.0f}%")
    out.print(flops)
    out.print(times)
    _footnotes(rows, "context", "context")


def _mark(row: dict) -> str:
    """Rows still implausible after bench measured them again (their reasons follow the table)."""
    return " !" if row.get("trusted") is False else ""


def _footnotes(rows: list[dict], key: str, label: str) -> None:
    """Each reason once, with the rows it puts in doubt (a pair of rows that disagree share one)."""
    doubted: dict[str, list[str]] = {}
    for row in rows:
        if row.get("trusted") is False:
            for reason in row["reason"].split("; "):
                doubted.setdefault(reason, []).append(str(row[key]))
    for reason, which in doubted.items():
        out.print(f"! {label} {', '.join(which)}: not to be trusted: {reason}", markup=False)


def _render_attention(attention: dict) -> None:
    table = titled_table(f"causal attention, batch 1 x {attention['n_head']} heads x {attention['head_dim']}, "
                         f"{attention['dtype']}: softmax(QK^T/sqrt(d))V written out, and "
                         f"F.scaled_dot_product_attention (SDPA); memory: {attention['memory_method']}",
                         ["T", "written out", "memory", "SDPA", "memory", "SDPA speed-up"])
    for row in attention["rows"]:
        table.add_row(str(row["seq_len"]) + _mark(row), ms(row["plain_ms"]), mib(row["plain_peak_bytes"]),
                      ms(row["sdpa_ms"]), mib(row["sdpa_peak_bytes"]), f"{row['speedup']:.1f}x")
    out.print(table)
    _footnotes(attention["rows"], "seq_len", "T =")
