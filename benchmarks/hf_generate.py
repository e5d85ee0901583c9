"""minigpt's sampling against Hugging Face transformers' `generate`, same shape, same process.

    pip install transformers   # not a dependency of minigpt; only this script needs it
    python benchmarks/hf_generate.py [--repeats 7] [--new-tokens 255] [--threads N] [--json]

Both sides decode greedily with a KV cache, batch 1, one-token prompt, `--new-tokens` tokens, from
random weights (speed does not depend on them) of the classic Shakespeare shape (6 layers, 6 heads,
384 wide, block 256, vocabulary 65; HF's GPT-2 with the same sizes, which adds biases). Cases: HF in
float32 and bfloat16 (`torch_dtype`), minigpt's decode path (what `minigpt sample` runs) in float32
and bfloat16. After one warm-up each, the cases take turns for --repeats rounds; times are the median
round, ratios the median over rounds of each round's ratio (a slow moment on a shared machine moves
both sides together). Also printed: the weight-read floor of one decode step per dtype (the bytes of
every weight matrix, read once) at the rate this machine streams memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sample_speed import CLASSIC, VOCAB, generation_seconds, stream_bytes_per_second, take_turns

from minigpt_cli.inference import Decoder
from minigpt_cli.model import GPT


def hf_model(dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=CLASSIC.block_size, n_embd=CLASSIC.n_embd,
                        n_layer=CLASSIC.n_layer, n_head=CLASSIC.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(dtype).eval()


@torch.inference_mode()
def hf_seconds(model, new_tokens: int) -> float:
    prompt = torch.zeros(1, 1, dtype=torch.long)
    start = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    seconds = time.perf_counter() - start
    assert out.shape[1] == new_tokens + 1
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=255)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.new_tokens
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    torch.manual_seed(0)
    ours = {name: Decoder(GPT(CLASSIC, VOCAB), dtype) for name, dtype in dtypes.items()}
    hf = {name: hf_model(dtype) for name, dtype in dtypes.items()}
    cases = {**{f"minigpt_{name}": (lambda m=ours[name]: generation_seconds(m, n, True)) for name in dtypes},
             **{f"hf_{name}": (lambda m=hf[name]: hf_seconds(m, n)) for name in dtypes}}
    times = take_turns(cases, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(slow: str, fast: str) -> float:
        return statistics.median(times[slow][r] / times[fast][r] for r in range(args.repeats))

    bandwidth = stream_bytes_per_second(torch.device("cpu"))
    floor = {name: sum(m.weight.nbytes for m in ours[name].matrices) / bandwidth for name in dtypes}
    result = {
        "model": f"{CLASSIC.n_layer} layers, {CLASSIC.n_head} heads, {CLASSIC.n_embd} wide, block "
                 f"{CLASSIC.block_size}, vocab {VOCAB}, batch 1, greedy, {n} new tokens",
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "tokens_per_second": {k: n / v for k, v in med.items()},
        "ms_per_step": {k: 1e3 * v / n for k, v in med.items()},
        "weight_read_floor_ms": {name: 1e3 * floor[name] for name in dtypes},
        "minigpt_over_hf": {
            "float32 vs HF float32": ratio("hf_float32", "minigpt_float32"),
            "bfloat16 vs HF bfloat16": ratio("hf_bfloat16", "minigpt_bfloat16"),
            "bfloat16 vs HF float32": ratio("hf_float32", "minigpt_bfloat16"),
        },
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['model']}; {result['threads']} threads, median of {args.repeats} rounds")
    for k, v in med.items():
        print(f"  {k:18s} {n / v:7.0f} tok/s  {1e3 * v / n:6.2f} ms a step")
    for name in dtypes:
        print(f"  weight-read floor, {name}: {1e3 * floor[name]:.3f} ms a step (weights / {bandwidth / 1e9:.1f} GB/s)")
    for k, v in result["minigpt_over_hf"].items():
        print(f"  minigpt {k}: {v:.2f}x")


if __name__ == "__main__":
    main()
