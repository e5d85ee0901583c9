"""Timing sampling as `minigpt sample` runs it: time to the first token, one decode step with the KV cache
and without it at growing contexts, the weight-read floor a decode step cannot beat, and batched decode."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from minigpt_cli.bench_state import MAX_FALL, BenchState, Doubts, growth_doubts, merge_doubts, settle, spread_doubts
from minigpt_cli.device import DTYPES
from minigpt_cli.inference import Decoder
from minigpt_cli.kv_cache import KVCache
from minigpt_cli.model import GPT, attention_flops, kv_bytes_per_token


@torch.inference_mode()
def time_sampling(s: BenchState, model: Decoder) -> dict[str, Any]:
    bs = s.m.block_size
    cache = s.cache(1, bs)
    out = _time_to_first_token(s, model, cache)
    floor = weight_floor(s, model)
    out["weight_floor"] = floor
    contexts = decode_contexts(bs, s.options.max_seq)
    out["decode"] = _decode_rows(s, model, cache, contexts, floor)
    out["floor_pct"] = out["decode"][0]["floor_pct"]
    out["cost"] = ("with the KV cache a step computes one new position: its weights cost the same at every "
                   "context and its attention grows linearly with the context L (one query, L keys); without "
                   "it a step recomputes all L positions: the weights' cost grows linearly with L and "
                   "attention's quadratically (L queries x L keys)")
    if contexts[-1] >= bs:
        out["past_block_size"] = (f"contexts past block_size {bs} are timed on a model of the same shape "
                                  f"with room for {contexts[-1] + 1} positions and fresh weights (a step's "
                                  f"cost does not depend on their values); sampling past block_size itself "
                                  f"slides a window of at most {bs} characters")
    out["batch"] = _batched_decode(s, model)
    return out


def _time_to_first_token(s: BenchState, model: Decoder, cache: KVCache) -> dict[str, Any]:
    """Prefill half a window (fewer tokens if that is over the budget), then choose one token."""
    P = max(1, s.m.block_size // 2)
    while P > 8 and s.forward_flops(P, P) > s.budget:
        P //= 2
    s.progress(f"sampling: prefill of {P} tokens")
    prompt = s.tokens(1, P)

    def prefill() -> None:
        cache.reset()
        model(prompt, cache)[:, -1].argmax(-1).item()

    ttft = s.time(prefill, s.forward_flops(P, P))
    return {"dtype": s.options.dtype, "prompt_len": P, "time_to_first_token_ms": ttft.to_dict(),
            "prefill_tokens_per_sec": P / ttft.median}


def _decode_rows(s: BenchState, model: Decoder, cache: KVCache, contexts: list[int], floor: dict) -> list[dict]:
    """One decode step at each context, with the cache and without; contexts past block_size on a
    model of the same shape with room for them. Implausible rows are measured again, then flagged."""
    bs = s.m.block_size
    long: list[tuple[Decoder, KVCache]] = []

    def measure(L: int) -> dict:
        s.progress(f"sampling: one decode step after {L} tokens, with and without the KV cache")
        if L < bs:
            return _decode_row(s, model, cache, L, floor)
        if not long:
            long.append(_long_model(s, contexts[-1] + 1))
        return _decode_row(s, *long[0], L, floor)

    def again(i: int) -> dict:
        s.progress(f"sampling: decode at context {rows[i]['context']} again (its numbers were implausible)")
        with s.measuring_again():
            return measure(rows[i]["context"])

    rows = [measure(L) for L in contexts]
    s.untrusted += settle(rows, lambda rows: decode_doubts(rows, s.device.type == "cpu"), again)
    return rows


def decode_doubts(rows: list[dict], cpu: bool = True) -> Doubts:
    """Why each row of the decode table cannot be trusted (see bench_state.settle)."""
    found = [growth_doubts([(f"context {r['context']}", r[flops], r[key]) for r in rows], name, cpu)
             for key, flops, name in (("cached_ms", "cached_flops", "the cached step"),
                                      ("uncached_ms", "uncached_flops", "the uncached step"))]
    for i, row in enumerate(rows):
        reasons = spread_doubts(row["cached_ms"], "the cached step") + spread_doubts(row["uncached_ms"],
                                                                                     "the uncached step")
        allowed = row["uncached_flops"] / row["cached_flops"]
        # The uncached step does `allowed` times the FLOPs in one batched pass, no less efficient per FLOP.
        if row.get("cache_speedup") and row["cache_speedup"] > allowed / (1 - MAX_FALL):
            reasons.append(f"the cache's speed-up of {row['cache_speedup']:.1f}x is beyond the {allowed:.1f}x "
                           f"fewer FLOPs it computes")
        if row["floor_pct"] > 100 / (1 - MAX_FALL):
            reasons.append(f"the cached step beat the weight-read floor ({row['floor_pct']:.0f}% of it "
                           f"reached): less time than reading its weights takes")
        found.append({i: reasons})
    return merge_doubts(*found)


def _decode_row(s: BenchState, model: Decoder, cache: KVCache, L: int, floor: dict) -> dict[str, Any]:
    token = s.tokens(1, 1)

    def cached_step() -> None:
        cache.reset()
        cache.advance(L)  # L positions cached (their values do not change the cost)
        model(token, cache)[:, -1].argmax(-1)

    row: dict[str, Any] = {"context": L, "past_block_size": L >= s.m.block_size,
                           "cached_flops": s.forward_flops(1, L + 1),
                           # The cached step's parts: the weights' cost is the same at every context,
                           # attention's (one query, L + 1 keys) grows with it.
                           "weights_flops": 2 * s.flops["matmul_params"],
                           "cached_attention_flops": attention_flops(s.m, 1, L + 1),
                           "uncached_flops": s.forward_flops(L + 1, L + 1)}
    timing = s.time(cached_step, s.forward_flops(1, L + 1))
    row["cached_ms"] = timing.to_dict()
    row["cached_tokens_per_sec"] = 1 / timing.median
    row["floor_pct"] = 100 * floor["ms"] / (timing.median * 1e3)
    if s.forward_flops(L + 1, L + 1) <= s.budget:
        window = s.tokens(1, L + 1)
        timing_full = s.time(lambda: model(window)[:, -1].argmax(-1), s.forward_flops(L + 1, L + 1))
        row["uncached_ms"] = timing_full.to_dict()
        row["uncached_tokens_per_sec"] = 1 / timing_full.median
        row["cache_speedup"] = timing_full.median / timing.median
    else:
        row["uncached_ms"] = row["uncached_tokens_per_sec"] = row["cache_speedup"] = None
        note = (f"decode without the KV cache at context {L} skipped: one step is "
                f"{s.forward_flops(L + 1, L + 1) / 1e9:.0f} GFLOP, over the {s.device.type} time bound")
        if note not in s.notes:  # a row measured again says it once
            s.notes.append(note)
    return row


def _batched_decode(s: BenchState, model: Decoder) -> list[dict]:
    """Throughput of one decode step at half a window of context, for each batch size that fits."""
    L = max(1, s.m.block_size // 2)
    sizes = s.options.batch_sizes or ((1, 4) if s.options.quick else (1, 4, 16, 64))
    batch = []
    for B in sizes:
        need = kv_bytes_per_token(s.m) * B * (L + 1)
        if not s.fits(need):
            s.notes.append(f"decode at batch {B} skipped: its KV cache needs {need / 2**30:.1f} GiB")
            continue
        if s.forward_flops(B, L + 1) > s.budget:
            s.notes.append(f"decode at batch {B} skipped: one step is {s.forward_flops(B, L + 1) / 1e9:.0f} "
                           f"GFLOP, over the {s.device.type} time bound")
            continue
        s.progress(f"sampling: one decode step for a batch of {B} after {L} tokens")
        batch_cache = s.cache(B, L + 1)
        tokens = s.tokens(B, 1)

        def batch_step() -> None:
            batch_cache.reset()
            batch_cache.advance(L)
            model(tokens, batch_cache)[:, -1].argmax(-1)

        timing = s.time(batch_step, s.forward_flops(B, L + 1))
        batch.append({"batch_size": B, "context": L, "step_ms": timing.to_dict(),
                      "tokens_per_sec": B / timing.median})
    return batch


def _long_model(s: BenchState, positions: int) -> tuple[Decoder, KVCache]:
    """The model's shape with room for `positions` positions, readied as `minigpt sample` readies it."""
    m = dataclasses.replace(s.m, block_size=positions)
    with torch.device(s.device):
        long_model = GPT(m, s.V)
    return Decoder(long_model, DTYPES[s.options.dtype]), s.cache(1, positions, m)


def weight_floor(s: BenchState, model: Decoder) -> dict[str, Any]:
    """One batch-1 matrix-vector product per weight matrix a decode step reads, back to back.

    A decode step must read every weight once, so this is the least one step can take on this
    device; its ratio to the real step shows how much time goes elsewhere (attention, norms,
    kernel launches, Python). Timed with F.linear on every matrix and, where the decoder
    packed some for oneDNN, with the decoder's own kernels too; the faster of the two is the floor.
    """
    s.progress("sampling: weight-read floor")
    modules = model.matrices
    vectors = {(m.in_features, m.weight.dtype): torch.randn(1, m.in_features, generator=s.generator,
                                                            device=s.device).to(m.weight.dtype)
               for m in modules}

    def with_linear() -> None:
        for m in modules:
            F.linear(vectors[m.in_features, m.weight.dtype], m.weight)

    def with_model_kernels() -> None:
        for m in modules:
            m.project(vectors[m.in_features, m.weight.dtype])

    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in modules)
    kernels = {"F.linear": s.time(with_linear, 2 * nbytes / 4)}
    if any(m.packed is not None for m in modules):
        kernels["model"] = s.time(with_model_kernels, 2 * nbytes / 4)
    kernel, timing = min(kernels.items(), key=lambda item: item[1].median)
    return {"ms": timing.median * 1e3, "timing": timing.to_dict(), "bytes": nbytes, "matrices": len(modules),
            "gb_per_s": nbytes / timing.median / 1e9, "kernel": kernel,
            "kernels_ms": {k: t.median * 1e3 for k, t in kernels.items()}}


def decode_contexts(block_size: int, max_seq: int) -> list[int]:
    """Contexts of the cached-against-uncached decode table: an eighth, half and all of the window,
    then doubling past block_size up to max_seq, where the uncached step's quadratic attention shows."""
    contexts = {max(1, block_size // 8), max(1, block_size // 2), block_size - 1}
    length = 2 * block_size
    while length <= max_seq:
        contexts.add(length - 1)
        length *= 2
    return sorted(contexts)
