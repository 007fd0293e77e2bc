"""QuaRot's fused rotation of the residual stream (Ashkboos et al. 2024, arXiv 2404.00456, Sec. 4.1) as an edit.

With x' = x Q (Q orthogonal, rows are tokens) everywhere on the residual stream, the model computes the same
function when, in (out, in) weights,

    embedding          E' = E Q
    input linears      W' = W diag(g) Q        (q/k/v after norm1, gate/up after norm2: Family.smooth_groups; the
                                                norm's gain g = norm_gain_offset + w is folded first and the norm
                                                left with gain 1, because RMS(x Q) = RMS(x) but diag(g) Q != Q diag(g))
    output linears     W' = Q^T W, b' = b Q    (o_proj, down_proj)
    LM head            W' = W diag(g_final) Q

A tied LM head is untied for the edit (the head gets its own parameter; undo ties it again), since the embedding
and the head need different matrices. Gemma-2/3 sandwich norms normalise the sublayer output with a per-channel
gain before the residual add: RMS commutes with Q but that gain does not, so there o_proj / down_proj keep their
basis and the output norm's output is rotated online (a hook, x Q: d^2 multiply-adds per token, not fused).
online_down_proj: QuaRot's online Hadamard before down_proj, W_down' = W_down H and a hook x -> x H on its input
(the hook runs before any quantization hook registered after it).

LayerNorm families (GPT-2, OPT, Falcon, BERT: Family.layer_norm) subtract the channel mean, which does not commute
with Q (QuaRot/SliceGPT turn them into RMSNorm first; not done here): refused in one line, as are families without
input norms (OLMo-2, post-LN) or a final norm. Every write goes through EditSession.set (whole matrices) and is
undone bit-exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from outlierlab.errors import UnsupportedArchitecture
from outlierlab.interventions.base import EditSession, Intervention
from outlierlab.models import offload
from outlierlab.quant.hadamard import KINDS, rotation
from outlierlab.quant.smoothing import smoothing_groups
from outlierlab.quant.targets import weight_view

WHOLE = (Ellipsis,)


def rotation_refusal(family) -> str | None:
    """Why this Family's residual stream cannot be rotated by this edit, or None when it can."""
    if family.encoder:
        return f"family {family.name} is an encoder (no LM head to rotate)"
    if family.layer_norm:
        return (f"family {family.name} uses LayerNorm (mean subtraction and bias do not commute with a rotation; "
                "folding it into RMSNorm as QuaRot/SliceGPT do is not implemented)")
    if family.experts is not None:
        return (f"family {family.name} is a mixture of experts (rotating the fused experts' 3-D weights and the "
                "router is not implemented)")
    if family.norm1 is None or family.norm2 is None or family.final_norm is None or family.smooth_groups is None:
        return f"family {family.name} has no input norms / final norm whose gains can be folded"
    return None


def check_rotatable(family) -> None:
    reason = rotation_refusal(family)
    if reason:
        raise UnsupportedArchitecture(f"rotation: {reason}")


class _Retie:
    """Handle that gives the LM head back the embedding's parameter (undo of an untie)."""

    def __init__(self, head: nn.Module, tied: nn.Parameter):
        self.head, self.tied = head, tied

    def remove(self) -> None:
        self.head.weight = self.tied


def _online(matrix: torch.Tensor):
    """A hook x -> x M (M cast once to the activation's dtype and device)."""
    cast: dict = {}

    def hook(x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        if key not in cast:
            cast[key] = matrix.to(device=x.device, dtype=x.dtype)
        return x @ cast[key]
    return hook


class Rotate(Intervention):
    """Rotate the residual stream by a seeded randomized Hadamard (kind="hadamard") or random orthogonal matrix."""

    def __init__(self, kind: str = "hadamard", seed: int = 0, online_down_proj: bool = False):
        if kind not in KINDS:
            raise ValueError(f"kind={kind} is not one of: {', '.join(KINDS)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer")
        if not isinstance(online_down_proj, bool):
            raise ValueError(f"online_down_proj={online_down_proj!r} must be true or false")
        self.kind, self.seed, self.online_down_proj = kind, seed, online_down_proj

    def apply(self, session: EditSession) -> None:
        sites = session.sites
        check_rotatable(sites.family)
        hidden = sites.module("embed").weight.shape[1]
        q, note = rotation(hidden, self.kind, self.seed)
        self._fold_inputs(session, q)
        sandwich = self._rotate_outputs(session, q)
        embed = sites.module("embed").weight
        session.set(embed, WHOLE, (offload.values(embed).double() @ q).to(embed.dtype))
        untied = self._rotate_head(session, q)
        entry = {"edit": "rotate", "kind": self.kind, "seed": self.seed, "rotation": note, "hidden": hidden,
                 "untied_lm_head": untied, "online_output_norms": sandwich}
        if self.online_down_proj:
            entry["online_down_proj"] = self._online_down_proj(session)
        session.log.append(entry)

    @staticmethod
    def _fold_gain(session: EditSession, norm_site: str) -> torch.Tensor:
        """The norm's gain (float64), with the norm set to gain 1."""
        norm = session.sites.module(norm_site)
        gain = session.sites.norm_gain(norm_site).double()
        session.set(norm.weight, WHOLE, torch.full(norm.weight.shape, 1.0 - session.sites.family.norm_gain_offset,
                                                          dtype=norm.weight.dtype))
        return gain

    def _fold_inputs(self, session: EditSession, q: torch.Tensor) -> None:
        for _, norm, linears in smoothing_groups(session.sites):
            gain = self._fold_gain(session, norm)
            for _, view in linears:  # dense blocks only (a mixture of experts is refused)
                rotated = (view.as_out_in().double() * gain[None, :]) @ q
                session.set(view.param, WHOLE, view.stored(rotated).to(view.param.dtype))

    def _rotate_outputs(self, session: EditSession, q: torch.Tensor) -> list[str]:
        """o_proj / down_proj: W' = Q^T W; behind a sandwich norm the norm's output is rotated online instead."""
        sites, online = session.sites, []
        for layer in range(sites.num_layers):
            for linear, output_norm in (("attn.o_proj", "norm_attn_out"), ("mlp.down_proj", "norm_mlp_out")):
                if sites.has(f"layers.{layer}.{output_norm}"):
                    session.hook(f"layers.{layer}.{output_norm}.out", _online(q))
                    online.append(f"layers.{layer}.{output_norm}.out")
                    continue
                module = sites.module(f"layers.{layer}.{linear}")
                view = weight_view(module)
                rotated = q.t() @ view.as_out_in().double()
                session.set(view.param, WHOLE, (rotated.t() if view.transposed else rotated).to(view.param.dtype))
                if getattr(module, "bias", None) is not None:
                    session.set(module.bias, WHOLE, (offload.values(module.bias).double() @ q).to(module.bias.dtype))
        return online

    def _rotate_head(self, session: EditSession, q: torch.Tensor) -> bool:
        """W_head' = W_head diag(g_final) Q; a head tied to the embedding gets its own parameter (True)."""
        model = session.loaded.model
        head, embed = model.get_output_embeddings(), session.sites.module("embed")
        original = session.original(head.weight, WHOLE) if head.weight is embed.weight else offload.values(head.weight)
        gain = self._fold_gain(session, "final_norm")
        rotated = ((original.double() * gain[None, :]) @ q).to(head.weight.dtype)
        if head.weight is not embed.weight:
            session.set(head.weight, WHOLE, rotated)
            return False
        session.add_hook(_Retie(head, head.weight))
        head.weight = nn.Parameter(rotated, requires_grad=False)
        return True

    def _online_down_proj(self, session: EditSession) -> str:
        sites = session.sites
        size = sites.down_proj(0).shape[1]
        h, note = rotation(size, self.kind, self.seed + 1)
        for layer in range(sites.num_layers):
            view = sites.down_proj(layer)
            rotated = view.as_out_in().double() @ h
            session.set(view.param, WHOLE, (rotated.t() if view.transposed else rotated).to(view.param.dtype))
            session.hook(f"layers.{layer}.mlp.down_proj.in", _online(h))
        return note
