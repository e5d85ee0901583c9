"""The CUDA, MPS and precision paths, checked on a CPU: the meta device (every tensor made where the
model lives), a dispatch mode that refuses float64, and torch.cuda / torch.backends.mps made to look
like an H100, an A100, a T4 and Macs on macOS 13 and 14. No GPU is needed, and none has run these."""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from minigpt_cli import device as dev
from minigpt_cli import inference
from minigpt_cli.config import ModelConfig, TrainConfig, UserError, load_config, shipped_configs
from minigpt_cli.inference import Decoder
from minigpt_cli.model import GPT
from minigpt_cli.optim import build_optimizers, newton_schulz_dtype
from minigpt_cli.sampler import SampleRequest, SamplingSettings, generate, prepare
from minigpt_cli.scoring import score_text

PACKAGE = Path(__file__).resolve().parent.parent / "minigpt_cli"
VOCAB = 11
TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=8)


def tiny_model(seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**TINY, "zero_init_proj": False, **options}), VOCAB)
    with torch.no_grad():  # short convolutions start at zero: random ones exercise them
        for name, p in model.named_parameters():
            if ".conv_" in name:
                p.normal_(0.0, 0.5)
    return model


# ---------------------------------------------------------------------------------------------
# The meta device: every model option, forward with a cache, both decode steps, backward, step
# ---------------------------------------------------------------------------------------------

class OnlyOn(TorchDispatchMode):
    """Fails on any operation that reads or makes a tensor (other than a 0-dim scalar) off `device`:
    a matmul of a meta tensor with a CPU one would otherwise pass unnoticed."""

    def __init__(self, device: str):
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and t.dim() and t.device.type != self.device:
                raise AssertionError(f"{func} touched a tensor on {t.device}, not {self.device}")
        return out


def shipped_model_options() -> list[dict]:
    """Each shipped config's model options (sizes shrunk), and one variant of each option beyond them."""
    options = []
    for name in shipped_configs():
        model = dataclasses.asdict(load_config(name).model)
        options.append({k: v for k, v in model.items() if k not in ("n_layer", "n_head", "n_embd", "block_size")})
    options += [dict(pos_encoding=p) for p in ("learned", "sinusoidal", "rope")]
    options += [dict(norm="layernorm", norm_placement="post", bias=True, activation="gelu"),
                dict(tie_weights=True, logit_softcap=30.0, qk_norm=False, short_conv=3, dropout=0.1)]
    return options


MODEL_OPTIONS = shipped_model_options()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", MODEL_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())[:60])
def test_every_model_option_runs_on_the_meta_device(options, dtype):
    meta = torch.device("meta")
    model = tiny_model(**options).to(meta)
    prompt = torch.zeros(1, 5, dtype=torch.long, device=meta)
    token = torch.zeros(2, 1, dtype=torch.long, device=meta)
    with OnlyOn("meta"), torch.no_grad():
        cache = model.new_kv_cache(2)
        model(prompt, cache)
        assert model(token, cache).shape == (2, 1, VOCAB)
        decoder = Decoder(model, dtype)
        assert decoder.step is not None
        cache = decoder.new_kv_cache(2)
        decoder(prompt, cache)
        assert decoder(token, cache).shape == (2, 1, VOCAB)  # the step with a Python position
        fixed = torch.full((1,), cache.length, dtype=torch.long, device=meta)
        logits = decoder.step(token, 0, cache.kv, fixed, cache.inputs)  # the form torch.compile traces
        assert logits.shape == (2, 1, VOCAB) and logits.dtype == torch.float32
    model.train().to(dtype)
    for optimizer in ("adamw", "muon"):
        optimizers = build_optimizers(model, TrainConfig(optimizer=optimizer), meta)
        with OnlyOn("meta"):
            logits = model(torch.zeros(2, 8, dtype=torch.long, device=meta))
            loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), torch.zeros(16, dtype=torch.long, device=meta))
            loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# No float64 on the hot paths (Apple's MPS has none)
# ---------------------------------------------------------------------------------------------

class NoFloat64(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise AssertionError(f"{func} made a float64 tensor")
        return out


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_training_scoring_and_sampling_make_no_float64(optimizer):
    from minigpt_cli.trainer import apply_gradients, training_loss

    cpu = torch.device("cpu")
    model = tiny_model(short_conv=3)
    precision = dev.choose_precision(cpu, "float32")
    optimizers = build_optimizers(model, TrainConfig(optimizer=optimizer), cpu)
    ids = np.random.default_rng(0).integers(0, VOCAB, 200).astype(np.uint16)
    x = torch.from_numpy(ids[:64].astype(np.int64)).view(8, 8)
    y = torch.from_numpy(ids[1:65].astype(np.int64)).view(8, 8)
    with NoFloat64():
        for _ in range(3):
            model.train()
            training_loss(model, x, y, cpu, precision).backward()
            apply_gradients(model, optimizers, None, 1.0)
        total, count = score_text(model, ids, 8, 4, 4, cpu, precision)
        for dtype in (torch.float32, torch.bfloat16):
            steps = list(generate(Decoder(model, dtype), [1, 2], 12, SamplingSettings(top_p=0.9),
                                  dev.make_generator(0), num_samples=2))
    assert count == len(ids) - 1 and math.isfinite(total) and len(steps) == 12


def test_scoring_sums_exactly_in_python_floats():
    # The total equals the exactly rounded sum of the per-character losses it is made of.
    cpu = torch.device("cpu")
    model = tiny_model().eval()
    ids = np.random.default_rng(1).integers(0, VOCAB, 41).astype(np.uint16)
    total, count = score_text(model, ids, 8, 8, 2, cpu, dev.choose_precision(cpu, "float32"))
    with torch.no_grad():
        nll = [F.cross_entropy(model(torch.from_numpy(ids[i:i + 9].astype(np.int64))[None, :-1])[0],
                               torch.from_numpy(ids[i + 1:i + 9].astype(np.int64)), reduction="none")
               for i in range(0, 40, 8)]
    assert count == 40 and total == pytest.approx(math.fsum(torch.cat(nll).tolist()), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The precision policy on GPUs and Macs that are not here
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_cuda(monkeypatch):
    """Make torch.cuda look like one GPU of a given compute capability (and claim bfloat16, as
    torch.cuda.is_bf16_supported does on a T4 through emulation)."""
    def install(capability: tuple[int, int], name: str, count: int = 1):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return install


@pytest.fixture
def fake_mac(monkeypatch):
    def install(macos: str, torch_version: str = "2.5.1"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
        monkeypatch.setattr(platform, "mac_ver", lambda: (macos, ("", "", ""), "arm64"))
        monkeypatch.setattr(torch, "__version__", torch_version)
    return install


@pytest.mark.parametrize("gpu, capability, dtype, scaler, ns_dtype", [
    ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16, False, torch.bfloat16),
    ("NVIDIA A100-SXM4-40GB", (8, 0), torch.bfloat16, False, torch.bfloat16),
    ("Tesla T4", (7, 5), torch.float16, True, torch.float32),
    ("Tesla V100-SXM2-16GB", (7, 0), torch.float16, True, torch.float32),
])
def test_auto_precision_and_newton_schulz_follow_the_compute_capability(fake_cuda, gpu, capability, dtype, scaler,
                                                                       ns_dtype):
    fake_cuda(capability, gpu)
    choice = dev.resolve_device("auto")
    assert choice.device.type == "cuda" and gpu in choice.reason
    precision = dev.choose_precision(choice.device, "auto")
    assert (precision.autocast_dtype, precision.use_grad_scaler) == (dtype, scaler)
    assert f"{capability[0]}.{capability[1]}" in precision.reason
    assert newton_schulz_dtype(choice.device) == ns_dtype
    # Evaluation autocasts the same way, with no scaler to make.
    assert dev.choose_precision(choice.device, "auto", training=False).use_grad_scaler is False


def test_bfloat16_asked_for_on_a_t4_says_it_is_emulated(fake_cuda):
    fake_cuda((7, 5), "Tesla T4")
    precision = dev.choose_precision(torch.device("cuda"), "bfloat16")
    assert precision.autocast_dtype == torch.bfloat16 and "emulated" in precision.reason


@pytest.mark.parametrize("macos, version, bfloat16_ok, autocast_ok", [
    ("13.6.1", "2.5.1", False, True),
    ("14.4", "2.5.1", True, True),
    ("14.4", "2.4.1", False, False),
])
def test_mac_precision(fake_mac, macos, version, bfloat16_ok, autocast_ok):
    fake_mac(macos, version)
    mps = dev.resolve_device("auto").device
    assert mps.type == "mps"
    assert dev.choose_precision(mps, "auto").autocast_dtype is None  # float32 unless asked
    assert newton_schulz_dtype(mps) == (torch.bfloat16 if bfloat16_ok else torch.float32)
    # float16 training: no gradient scaler on MPS, so refused on every Mac.
    with pytest.raises(UserError, match="float16 training is not supported on Apple MPS"):
        dev.choose_precision(mps, "float16")
    for dtype, ok in (("bfloat16", bfloat16_ok), ("float16", autocast_ok)):
        if ok:
            assert dev.choose_precision(mps, dtype, training=dtype == "bfloat16").name == dtype
        else:
            with pytest.raises(UserError, match="macOS 14|PyTorch 2.5"):
                dev.choose_precision(mps, dtype, training=False)
    if bfloat16_ok:
        dev.check_inference_dtype("bfloat16", mps)
    else:  # sampling's bfloat16 weights need the same Mac
        with pytest.raises(UserError, match="macOS 14|PyTorch 2.5"):
            dev.check_inference_dtype("bfloat16", mps)


def test_compile_is_refused_on_mps_for_training_and_sampling(fake_mac):
    fake_mac("14.4")
    with pytest.raises(UserError, match="not supported on Apple MPS"):
        with dev.runtime("mps", "float32", compile=True):
            pass
    with pytest.raises(UserError, match="not supported on Apple MPS"):
        prepare(SampleRequest(run=None, prompt="", device="mps", compile=True))
    dev.check_compile(torch.device("cuda"))
    dev.check_compile(torch.device("cpu"))


def test_a_local_rank_past_the_visible_gpus_is_a_user_error(fake_cuda, monkeypatch):
    fake_cuda((9, 0), "NVIDIA H100", count=2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("set_device reached"))
    with pytest.raises(UserError, match="LOCAL_RANK 2 .* 2 CUDA device"):
        dev._join_process_group(dev.Distributed(rank=2, local_rank=2, world_size=3), "auto")


def test_deterministic_cuda_is_strict_and_sets_cublas_before_cuda_is_touched(fake_cuda, monkeypatch):
    fake_cuda((8, 0), "NVIDIA A100")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    seen = {}
    real_resolve = dev.resolve_device

    def resolve(name):
        seen["cublas_at_device_choice"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        return real_resolve(name)

    monkeypatch.setattr(dev, "resolve_device", resolve)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, warn_only=False: seen.update(
        on=on, warn_only=warn_only))
    with dev.runtime("cuda", "float32", deterministic=True) as rt:
        assert rt.device.type == "cuda"
    assert seen == {"cublas_at_device_choice": ":4096:8", "on": True, "warn_only": False}
    assert torch.backends.cudnn.benchmark is False


def test_tf32_is_on_for_cuda_only_and_put_back():
    before = torch.backends.cuda.matmul.allow_tf32
    with dev.fast_float32_matmuls(torch.device("cpu")):
        assert torch.backends.cuda.matmul.allow_tf32 == before
    with dev.fast_float32_matmuls(torch.device("cuda")):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_threads_are_chosen_on_the_cpu_only(monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("threads set for a GPU"))
    assert dev.use_threads(1e9, device=torch.device("cuda")) is None
    assert dev.use_threads(1e9, device=torch.device("mps")) is None
    with pytest.raises(UserError, match="--threads"):
        dev.use_threads(1e9, requested=-1, device=torch.device("cuda"))


VM_STAT = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               10000.
Pages active:                            200000.
Pages inactive:                            5000.
Pages speculative:                         1000.
"""


def test_free_memory_on_a_mac_comes_from_vm_stat(monkeypatch):
    assert dev.vm_stat_available(VM_STAT) == 16384 * 16000
    monkeypatch.setattr(dev, "_meminfo_available", lambda: (_ for _ in ()).throw(FileNotFoundError("/proc")))
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, VM_STAT, ""))
    assert dev.available_memory(torch.device("cpu")) == 16384 * 16000


def test_free_memory_here_is_a_positive_number():
    assert dev.available_memory(torch.device("cpu")) > 0


# ---------------------------------------------------------------------------------------------
# Decoding on GPUs: CUDA-graph outputs, the cache's dtype
# ---------------------------------------------------------------------------------------------

def test_a_step_that_reuses_its_output_buffer_still_gives_every_step_its_own_logits():
    # CUDA graphs (torch.compile's reduce-overhead) hand back the same memory at every replay.
    model = tiny_model().eval()
    decoder = Decoder(model, torch.float32, script=False)
    buffer = torch.empty(2, 1, VOCAB)

    def graph_like(idx, position, kv, fixed_position, inputs):
        return buffer.copy_(decoder.step(idx, position, kv, fixed_position, inputs))

    decoder.compiled, decoder.copy_logits = graph_like, True
    settings = SamplingSettings(temperature=1.0)
    got = list(generate(decoder, [1, 2, 3], 20, settings, dev.make_generator(5), num_samples=2))
    want = list(generate(model, [1, 2, 3], 20, settings, dev.make_generator(5), num_samples=2, use_cache=False))
    assert [s.tokens.tolist() for s in got] == [s.tokens.tolist() for s in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-4)


def test_the_cache_is_float32_on_a_cpu_and_the_steps_dtype_on_a_gpu():
    assert inference.cache_dtype(torch.device("cpu"), torch.bfloat16) == torch.float32
    assert inference.cache_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16
    assert inference.cache_dtype(torch.device("mps"), torch.float32) == torch.float32


@pytest.mark.parametrize("options", [dict(), dict(short_conv=3), dict(pos_encoding="learned", qk_norm=False)])
def test_a_bfloat16_cache_as_a_gpu_keeps_it_matches_the_uncached_model(monkeypatch, options):
    monkeypatch.setattr(inference, "cache_dtype", lambda device, dtype: dtype)  # the GPU choice, on this CPU
    decoder = Decoder(tiny_model(**options).eval(), torch.bfloat16, script=False)
    ids = torch.tensor([[1, 4, 2, 7, 3, 9, 0, 5]])
    cache = decoder.new_kv_cache(1)
    assert cache.kv.dtype == torch.bfloat16
    cached = [decoder(ids[:, :3], cache)[:, -1]] + [decoder(ids[:, t:t + 1], cache)[:, -1] for t in range(3, 8)]
    for t, logits in enumerate(cached, start=3):
        torch.testing.assert_close(logits, decoder(ids[:, :t])[:, -1], atol=0.05, rtol=0.05)


# ---------------------------------------------------------------------------------------------
# Static checks: no float64, and every tensor made on a named device
# ---------------------------------------------------------------------------------------------

FACTORIES = {"zeros", "ones", "empty", "arange", "full", "tensor", "randn"}
DEVICE_FILES = ["model.py", "inference.py", "sampler.py", "kv_cache.py", "scoring.py", "optim.py"]


def test_the_package_asks_for_no_float64():
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if (".double()" in code or "torch.float64" in code) and "not MPS" not in line:
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert not found, "float64 (Apple's MPS has none); a line that never runs on MPS says 'not MPS' in a comment:\n" \
        + "\n".join(found)


@pytest.mark.parametrize("name", DEVICE_FILES)
def test_every_tensor_factory_names_its_device(name):
    source = (PACKAGE / name).read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    # A parameter's initial value is made where the module is built (the default device, which
    # shapes_only sets to meta), as nn.Linear's is; model.to(device) moves it with the rest.
    parameters = {id(arg) for node in ast.walk(tree) if isinstance(node, ast.Call)
                  and isinstance(node.func, ast.Attribute) and node.func.attr == "Parameter" for arg in node.args}
    missing = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and id(node) not in parameters and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)
                and "CPU-only" not in lines[node.lineno - 1]):
            missing.append(f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not missing, "tensor factories without device= (or a '# CPU-only: why' comment):\n" + "\n".join(missing)
