"""GaLore's gradient low-rank projection (Zhao et al. 2024, arXiv 2403.03507), the low-rank half of OwLore (Li et
al. 2024, arXiv 2405.18380: outlier-weighted layer sampling + GaLore on the sampled layers).

For every 2-D parameter of a projected group, at each step:
    G (m x n)  ->  R = P^T G (r x n) when m <= n,  R = G Q^T (m x r) when m > n     (GaLore's "std" projection:
                   the smaller side is projected, P / Q the top-r left / right singular vectors of G)
    Adam's moments live in R's shape (r x max(m, n) numbers each instead of m x n)
    N = Adam direction of R;  W -= lr * scale * (P N  or  N Q)   (the update lies in a rank-r subspace)
    P / Q are recomputed from the current gradient every `update_gap` of that parameter's steps (its own count, so a
    block LISA samples again gets a fresh subspace); the moments are kept across a refresh, as in GaLore's code.
Weight decay is decoupled (AdamW) on the full weight. Parameters of the other groups get plain AdamW, so one
optimizer serves the whole selection and its state_dict (moments and projections) makes a run resumable.

Not the `galore-torch` package: its wheel requires bitsandbytes (a CUDA library) for its 8-bit variant, which this
CPU lock does not carry; the projection is the ~20 lines below, tested in tests/test_finetune.py.
"""
from __future__ import annotations

import math

import torch


def orthogonal_basis(grad: torch.Tensor, rank: int) -> tuple[str, torch.Tensor]:
    """("left", P [m, r]) when m <= n, else ("right", Q [r, n]): the top-r singular vectors of the smaller side."""
    u, _s, vh = torch.linalg.svd(grad.detach().float(), full_matrices=False)
    rows, cols = grad.shape
    rank = min(rank, rows, cols)
    if rows <= cols:
        return "left", u[:, :rank].contiguous()
    return "right", vh[:rank].contiguous()


def project(grad: torch.Tensor, side: str, basis: torch.Tensor) -> torch.Tensor:
    return basis.t() @ grad if side == "left" else grad @ basis.t()


def project_back(low: torch.Tensor, side: str, basis: torch.Tensor) -> torch.Tensor:
    return basis @ low if side == "left" else low @ basis


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose groups with `rank` set project each 2-D gradient as above (groups without it: plain AdamW)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 rank: int | None = None, update_gap: int = 200, scale: float = 1.0):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "rank": rank,
                    "update_gap": update_gap, "scale": scale}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.float()
                state = self.state[param]
                if not state:
                    state["step"] = 0
                projected = group["rank"] is not None and param.dim() == 2
                if projected:
                    if "basis" not in state or state["step"] % group["update_gap"] == 0:
                        side, state["basis"] = orthogonal_basis(grad, int(group["rank"]))
                        state["left"] = side == "left"
                    side = "left" if state["left"] else "right"
                    grad = project(grad, side, state["basis"])
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
                direction = exp_avg / (exp_avg_sq.sqrt() + group["eps"] * math.sqrt(1 - beta2 ** step))
                if projected:
                    direction = project_back(direction, side, state["basis"]) * group["scale"]
                if group["weight_decay"]:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(direction.to(param.dtype), alpha=-step_size)
        return loss
