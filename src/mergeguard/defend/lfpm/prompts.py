"""LFPM's visual prompts Π, mined by ascent on the merge's excess feature reaction over θ0's (stage I, and
re-mined as τa trains): a soft mask over the image (`mask`, the default), a patch pasted at a random position
(`patch`) or learnable tokens inside the network (`tokens`). Each one: `apply`, `ascend`, `area`, `tokens`,
`state_dict` / `load_state_dict` (a resumed run), `save` (the output's prompts.safetensors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mergeguard.data.triggers import TrainableTriggers
from mergeguard.defend.lfpm.settings import LFPMConfig
from mergeguard.trainer import all_reduce_mean


def _paste(images: torch.Tensor, patch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Paste the patch at one random position (the same for the batch)."""
    size, side = images.shape[-1], patch.shape[-1]
    i, j = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=gen))
    out = images.clone()
    out[:, :, i:i + side, j:j + side] = patch
    return out


# (x, x⊕Π, grad through θ0?, prompt tokens or None) -> D
Excess = Callable[[torch.Tensor, torch.Tensor, bool, "torch.Tensor | None"], torch.Tensor]


def _log_ascent(e: torch.Tensor, opt: torch.optim.Optimizer, params: list[torch.Tensor],
                penalty: torch.Tensor | float = 0.0) -> float:
    """One optimizer step of the prompt `params` up `log E − penalty`, E = `e`'s mean over the whole
    (all processes') batch; returns E. Call with gradients enabled.

    d(−log E)/dΠ = −(dE/dΠ) / E: −e / E has that gradient here, and averaging it over processes
    gives the global one."""
    (e_all,) = all_reduce_mean([e.detach()])
    loss = -e / (e_all + 1e-12) + penalty
    opt.zero_grad()
    loss.backward()
    for p, g in zip(params, all_reduce_mean([p.grad for p in params])):
        p.grad = g
    opt.step()
    return float(e_all)


class MaskPrompt:
    """Π as a pattern p and a soft mask m over the whole image: x ⊕ Π = (1 − m) x + m p,
    m = σ(a), p = σ(b) — the scan's trainable trigger (`data.triggers.TrainableTriggers`, one row). Ascent on
    `log E‖D‖² − c · mean(m)`: the log makes the ascent scale-free, so a weak backdoor (a TIES merge's)
    is found as readily as a strong one, and the mask penalty keeps Π trigger-sized. On a clean merge it
    finds only θ0-like reactions, whose excess is small, so τa barely moves."""

    def __init__(self, size: int, cfg: LFPMConfig, gen: torch.Generator, dev: torch.device):
        self.prompt = TrainableTriggers(1, size, cfg.patch_lr, gen, dev, start=-3.0)
        self.penalty = cfg.mask_penalty

    def start_from(self, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        """Start at a given mask (1, H, W) and pattern (3, H, W) in [0, 1]: a trigger the scan recovered."""
        eps = 1e-3
        with torch.no_grad():
            self.prompt.a[0].copy_(torch.logit(mask.float().clamp(eps, 1 - eps)).to(self.prompt.a.device))
            self.prompt.b[0].copy_(torch.logit(pattern.float().clamp(eps, 1 - eps)).to(self.prompt.b.device))

    def apply(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        return self.prompt.apply(x, grad, row=0)

    def ascend(self, excess: Excess, x: torch.Tensor) -> float:
        with torch.enable_grad():
            e = excess(x, self.apply(x, grad=True), True, None).float().pow(2).sum(1).mean()
            return _log_ascent(e, self.prompt.opt, [self.prompt.a, self.prompt.b],
                               self.penalty * self.prompt.mask(grad=True).mean())

    def area(self) -> float:
        return float(self.prompt.area()[0])

    def tokens(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        state = self.prompt.state_dict()  # the saved shapes of an older run: (1, H, W) and (3, H, W)
        return {**state, "a": state["a"][0], "b": state["b"][0]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompt.load_state_dict({**state, "a": state["a"][None], "b": state["b"][None]})

    def save(self) -> dict[str, torch.Tensor]:
        return {"mask": self.prompt.mask()[0].cpu(), "pattern": self.prompt.pattern()[0].cpu()}


class PatchPrompt:
    """Π as a small square patch pasted at a random position each time (the seeds' universal
    patch); sign ascent on E‖D‖² with θ0's reaction taken without gradient."""

    def __init__(self, size: int, cfg: LFPMConfig, gen: torch.Generator, dev: torch.device):
        side = max(1, round(cfg.patch_fraction * size))
        self.size = size
        self.patch = torch.rand(3, side, side, generator=gen).to(dev)
        self.gen, self.lr = gen, cfg.patch_lr

    def _position(self) -> torch.Generator:
        return torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,), generator=self.gen)))

    def apply(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        return _paste(x, self.patch, self._position())

    def ascend(self, excess: Excess, x: torch.Tensor) -> float:
        with torch.enable_grad():
            p = self.patch.clone().requires_grad_(True)
            e = excess(x, _paste(x, p, self._position()), False, None).float().pow(2).sum(1).mean()
            (grad,) = torch.autograd.grad(e, p)
        grad, e = all_reduce_mean([grad, e.detach()])
        self.patch = (self.patch + self.lr * grad.sign()).clamp(0, 1)
        return float(e)

    def area(self) -> float:
        return self.patch.shape[-1] ** 2 / self.size ** 2  # the patch's share of the image

    def tokens(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"patch": self.patch.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.patch = state["patch"].to(self.patch.device)

    def save(self) -> dict[str, torch.Tensor]:
        return {"patch": self.patch.detach().cpu()}


class TokenPrompt:
    """Π as P learnable tokens (VPT) inserted after the class token, before `ln_pre` (which
    normalises each token, so only their directions matter): the image is untouched and the
    prompt acts inside the network. Ascent as the mask's, on `log E‖D‖²` (Adam)."""

    def __init__(self, cfg: LFPMConfig, gen: torch.Generator, dev: torch.device, width: int):
        self.t = torch.randn(max(1, cfg.prompt_tokens), width, generator=gen).to(dev).requires_grad_(True)
        self.opt = torch.optim.Adam([self.t], lr=cfg.patch_lr)

    def apply(self, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        return x

    def tokens(self, grad: bool = False) -> torch.Tensor:
        return self.t if grad else self.t.detach()

    def ascend(self, excess: Excess, x: torch.Tensor) -> float:
        with torch.enable_grad():
            e = excess(x, x, True, self.t).float().pow(2).sum(1).mean()
            return _log_ascent(e, self.opt, [self.t])

    def area(self) -> None:
        return None  # no pixels

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t.detach().cpu(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.t.copy_(state["t"])
        self.opt.load_state_dict(state["opt"])

    def save(self) -> dict[str, torch.Tensor]:
        return {"tokens": self.t.detach().cpu()}


class PromptPool:
    """Several mined prompts, checkpointed together."""

    def __init__(self, prompts: list):
        self.prompts = prompts
        self.mined: list[float] = []  # E‖D‖² of each prompt after stage I (the report's, kept for a resume)
        self.fresh = 0  # prompts mined anew during stage II (`fresh_prompt_every`)

    def state_dict(self) -> dict[str, Any]:
        return {"mined": torch.tensor(self.mined), "fresh": self.fresh,
                **{str(i): p.state_dict() for i, p in enumerate(self.prompts)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mined = state["mined"].tolist()
        self.fresh = int(state.get("fresh", 0))
        for i, p in enumerate(self.prompts):
            p.load_state_dict(state[str(i)])


def make_prompt(cfg: LFPMConfig, gen: torch.Generator, dev: torch.device, image_size: int, width: int) -> Any:
    """A fresh prompt of the kind `cfg.prompt` names, drawn from `gen`."""
    if cfg.prompt == "tokens":
        return TokenPrompt(cfg, gen, dev, width)
    return (MaskPrompt if cfg.prompt == "mask" else PatchPrompt)(image_size, cfg, gen, dev)
