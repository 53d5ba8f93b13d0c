"""The trainer core: schedule, and a killed-then-resumed run ending where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch

from mergeguard.trainer import Checkpointing, TrainConfig, fit, lr_factor


def test_warmup_then_cosine():
    cfg = TrainConfig(steps=110, warmup=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(60, cfg) == pytest.approx(0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(64, 5), torch.randint(3, (64,))
    sampler = torch.Generator().manual_seed(1)

    def loss_at(step):
        idx = torch.randint(64, (8,), generator=sampler)
        noise = torch.randn(8, 5) * 0.01  # the global RNG is checkpointed too
        return torch.nn.functional.cross_entropy(model(x[idx] + noise), y[idx])

    return model, loss_at, sampler


def test_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(steps=30, lr=0.05, warmup=3)
    model, loss_at, sampler = _problem()
    expected_losses = fit(model.parameters(), loss_at, cfg)
    expected = [p.detach().clone() for p in model.parameters()]

    model, loss_at, sampler = _problem()
    ck = Checkpointing(tmp_path / "state.pt", every=5, generators={"sampler": sampler})

    def dies_at_17(step):
        if step == 17:
            raise KeyboardInterrupt
        return loss_at(step)

    with pytest.raises(KeyboardInterrupt):
        fit(model.parameters(), dies_at_17, cfg, checkpointing=ck)
    assert ck.path.exists()
    model, loss_at, sampler = _problem()  # a fresh process: new model, new generators
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # whatever it holds is overwritten by the checkpoint
    ck = Checkpointing(tmp_path / "state.pt", every=5, resume=True, generators={"sampler": sampler})
    losses = fit(model.parameters(), loss_at, cfg, checkpointing=ck)
    assert losses == pytest.approx(expected_losses)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
    assert not ck.path.exists()  # finished runs leave no checkpoint


def test_gradients_accumulated_inside_loss_at_are_kept():
    """LFPM's path integral runs one backward per path point inside loss_at; the core must not wipe them."""
    w = torch.nn.Parameter(torch.zeros(1))

    def loss_at(step):
        (w * 1.0).sum().backward()  # a first path point: gradient 1
        return (w * 2.0).sum()  # the last point: gradient 2; the core backpropagates it

    fit([w], loss_at, TrainConfig(steps=1, lr=0.1, weight_decay=0.0, grad_clip=None))
    # Adam's first step moves by lr in the gradient's sign whatever its size; check the gradient itself
    assert w.grad is not None and float(w.grad) == 3.0


def test_resume_refuses_a_checkpoint_of_other_shapes(tmp_path):
    """Same number of parameters, other shapes (e.g. another LoRA rank): one sentence, no traceback."""
    from mergeguard.errors import MergeguardError

    cfg = TrainConfig(steps=4, lr=0.05, warmup=0)
    a = torch.nn.Parameter(torch.zeros(2))

    def dies_at_3(step):
        if step == 3:
            raise KeyboardInterrupt
        return (a - 1).pow(2).sum()

    with pytest.raises(KeyboardInterrupt):
        fit([a], dies_at_3, cfg, checkpointing=Checkpointing(tmp_path / "s.pt", every=1))
    b = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(MergeguardError, match="different run"):
        fit([b], lambda step: (b - 1).pow(2).sum(), cfg,
            checkpointing=Checkpointing(tmp_path / "s.pt", every=1, resume=True))


@pytest.mark.parametrize("device, message", [
    ("foo", "unknown --device 'foo'"),
    ("meta", "runs on cpu or cuda"),
] + ([] if torch.cuda.is_available() else [("cuda", "torch sees no CUDA GPU")]))
def test_a_device_that_cannot_run_is_one_sentence(device, message):
    from mergeguard.errors import MergeguardError
    from mergeguard.trainer import resolve_device

    with pytest.raises(MergeguardError, match=message):
        resolve_device(device)
    assert resolve_device("cpu") == torch.device("cpu")
