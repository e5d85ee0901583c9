"""Muon's orthogonalisation and the precision it runs in."""

from __future__ import annotations

import pytest
import torch

from minigpt_cli import optim


@pytest.mark.parametrize("rows, cols", [(64, 64), (96, 32), (32, 96)])
def test_orthogonalize_keeps_the_singular_vectors_and_pushes_the_values_near_one(rows, cols):
    gen = torch.Generator().manual_seed(0)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
    g = 7.0 * u @ torch.diag(torch.logspace(-1.5, 0, k)) @ v.T  # a 30:1 spread of singular values
    x = optim.orthogonalize(g)
    assert x.shape == g.shape and x.dtype == g.dtype
    s = torch.linalg.svdvals(x)
    # The quintic iteration trades exactness for speed: it leaves singular values in about (0.7, 1.2).
    assert s.min() > 0.5 and s.max() < 1.3, s
    polar = u @ v.T  # U V^T, what the iteration approximates
    assert torch.nn.functional.cosine_similarity(x.flatten(), polar.flatten(), dim=0) > 0.95


def test_orthogonalize_treats_a_stack_as_separate_matrices():
    g = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))
    g[1] *= 1000  # one matrix far larger than the others must not swamp their normalisation
    x = optim.orthogonalize(g)
    for i in range(3):
        assert torch.allclose(x[i], optim.orthogonalize(g[i]), atol=1e-5)


def test_muon_batches_matrices_of_one_shape_yet_updates_each_as_if_alone(monkeypatch):
    """Tall, wide and split (q, k, v) matrices, two of each shape: each moves by -lr * scale * the
    orthogonalised Nesterov direction of its own gradient, as the method defines it."""
    monkeypatch.setattr(optim, "newton_schulz_dtype", lambda device: torch.float32)  # on any CPU
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (48, 16), (16, 48), (24, 8), (24, 8)]
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    params[4].muon_split = params[5].muon_split = 3
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    muon = optim.Muon(params, lr=0.1, momentum=0.9)
    muon.step()
    for p, old in zip(params, before):
        split = getattr(p, "muon_split", 1)
        rows, cols = p.shape[0] // split, p.shape[1]
        direction = p.grad + 0.9 * p.grad  # first step: the momentum buffer is the gradient
        expected = torch.cat([optim.orthogonalize(block, dtype=torch.float32)
                              for block in direction.split(rows)])
        expected = old - 0.1 * max(1.0, rows / cols) ** 0.5 * expected
        torch.testing.assert_close(p.detach(), expected, atol=2e-5, rtol=1e-4)


def test_newton_schulz_runs_in_float32_on_a_cpu_without_native_bfloat16(monkeypatch):
    # Emulated bfloat16 made Muon's step 10-30x slower than float32 on an AVX2-only CPU.
    monkeypatch.setattr(optim, "cpu_has_fast_bfloat16", lambda: False)
    assert optim.newton_schulz_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(optim, "cpu_has_fast_bfloat16", lambda: True)
    assert optim.newton_schulz_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    assert optim.newton_schulz_dtype(torch.device("cuda")) == torch.bfloat16


def test_muon_steps_in_the_precision_chosen_for_the_device(monkeypatch):
    seen = []
    real = torch.Tensor.to

    def spy(self, *args, **kwargs):
        if args and isinstance(args[0], torch.dtype):
            seen.append(args[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(optim, "cpu_has_fast_bfloat16", lambda: False)
    p = torch.nn.Parameter(torch.randn(16, 8))
    p.grad = torch.randn(16, 8)
    before = p.detach().clone()
    monkeypatch.setattr(torch.Tensor, "to", spy)
    optim.Muon([p], lr=0.1).step()
    monkeypatch.undo()
    assert torch.bfloat16 not in seen and torch.float32 in seen
    assert not torch.equal(p.detach(), before)


def schedule(**overrides):
    from minigpt_cli.config import TrainConfig
    return TrainConfig(**{"warmup_iters": 50, "schedule": "wsd", "decay_fraction": 0.3, **overrides})


def test_warm_up_then_hold_then_decay_linearly_to_the_minimum():
    t = schedule(decay_shape="linear")
    assert optim.lr_factor(t, 0, -1.0) == pytest.approx(1 / 50)
    assert optim.lr_factor(t, 24, -0.5) == pytest.approx(25 / 50)
    assert optim.lr_factor(t, 50, 0.0) == 1.0
    assert optim.lr_factor(t, 500, 0.69) == 1.0
    assert optim.lr_factor(t, 900, 0.85) == pytest.approx(0.5)
    assert optim.lr_factor(t, 1000, 1.0) == 0.0
    cosine = schedule(schedule="cosine")
    assert optim.lr_factor(cosine, 100, 0.5) == pytest.approx(0.5)
    assert optim.lr_factor(cosine, 1000, 1.0) == pytest.approx(0.0)


def test_the_square_root_decay_stays_higher_and_ends_at_the_minimum():
    t = schedule()  # decay_shape "sqrt", the default
    assert optim.lr_factor(t, 500, 0.69) == 1.0
    # a quarter of the way into the decay: 1 - sqrt(0.25), where the straight line is at 0.75
    assert optim.lr_factor(t, 775, 0.775) == pytest.approx(0.5)
    assert optim.lr_factor(t, 850, 0.85) == pytest.approx(1 - 0.5 ** 0.5)
    assert optim.lr_factor(t, 1000, 1.0) == 0.0
    factors = [optim.lr_factor(t, step, step / 1000) for step in range(700, 1001, 10)]
    assert factors == sorted(factors, reverse=True)


def test_a_run_saved_before_decay_shape_keeps_its_linear_decay():
    from minigpt_cli.config import Config, config_from_checkpoint_dict

    saved = Config().to_dict()
    del saved["train"]["decay_shape"]
    assert config_from_checkpoint_dict(saved).train.decay_shape == "linear"
    assert config_from_checkpoint_dict(Config().to_dict()).train.decay_shape == "sqrt"


def test_a_time_budget_ends_the_warm_up_by_its_share_of_the_time():
    t = schedule()
    # Step 2 of 50, but 5% of the budget's training time is gone: warm-up is over.
    assert optim.lr_factor(t, 2, 0.05, time_share=optim.WARMUP_SHARE) == 1.0
    # Halfway through the warm-up's share of the time, the rate is at least halfway up.
    assert optim.lr_factor(t, 2, 0.025, time_share=optim.WARMUP_SHARE / 2) == pytest.approx(0.5)
    # Where the steps are further along than the time, the steps lead.
    assert optim.lr_factor(t, 39, 0.01, time_share=0.001) == pytest.approx(40 / 50)
    # Without a budget the warm-up is warmup_iters steps, however short the run.
    assert optim.lr_factor(t, 2, 0.9) == pytest.approx(3 / 50)


def _params(seed: int = 1) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(7, 5, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]


def _adamw_steps(opt, params, steps: range) -> None:
    """Steps with seeded gradients and a learning rate that changes every step, as the schedule does."""
    for step in steps:
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        for group in opt.param_groups:
            group["lr"] = 1e-2 / (step + 1)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _groups(params):
    return [{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]


def test_adamw_takes_exactly_the_steps_of_torch_fused_adamw():
    """Training's losses stay what they were with torch.optim.AdamW(fused=True), to the bit."""
    ours, theirs = _params(), _params()
    _adamw_steps(optim.AdamW(_groups(ours), lr=1e-2, betas=(0.9, 0.95)), ours, range(6))
    reference = torch.optim.AdamW(_groups(theirs), lr=1e-2, betas=(0.9, 0.95), fused=True)
    _adamw_steps(reference, theirs, range(6))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("first, then", [("torch", "ours"), ("ours", "torch")])
def test_optimizer_state_resumes_across_torch_adamw_and_ours(first, then):
    """A run saved by an older minigpt (torch.optim's AdamW) resumes here as if never stopped, and
    the other way round."""
    make = {"ours": lambda p: optim.AdamW(_groups(p), lr=1e-2, betas=(0.9, 0.95)),
            "torch": lambda p: torch.optim.AdamW(_groups(p), lr=1e-2, betas=(0.9, 0.95), fused=True)}
    whole = _params()
    _adamw_steps(make["ours"](whole), whole, range(5))
    resumed = _params()
    before = make[first](resumed)
    _adamw_steps(before, resumed, range(3))
    after = make[then](resumed)
    after.load_state_dict(before.state_dict())
    _adamw_steps(after, resumed, range(3, 5))
    for a, b in zip(whole, resumed):
        assert torch.equal(a, b)


def test_a_saved_state_for_other_parameters_is_refused():
    params = _params()
    saved = optim.AdamW([{"params": params}], lr=1e-2, betas=(0.9, 0.95))
    _adamw_steps(saved, params, range(1))
    with pytest.raises(ValueError, match="parameter group"):
        optim.AdamW(_groups(_params()), lr=1e-2, betas=(0.9, 0.95)).load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match="size"):
        optim.AdamW([{"params": params[:1]}], lr=1e-2, betas=(0.9, 0.95)).load_state_dict(saved.state_dict())
