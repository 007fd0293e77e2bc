"""Simulated quantization as interventions (paper SW Sec. 4): weights through EditSession (undone bit-exactly),
activations through forward pre-hooks on the linear layers.

    QuantizeWeights       RTN of every decoder-block linear weight; with clip_zscore + restore_super_weights it is
                          the paper's SW-aware RTN: clip outliers before the range is taken, quantize, then put the
                          super weights back exactly (W^ = RESTORE(Q^-1(Q(CLIP_z(W))))).
    QuantizeActivations   dynamic RTN of each linear's input; holdout=1 is the paper's super-activation handling
                          (replace the largest |x| of the tensor by the median, quantize, restore it).
    SmoothQuant           the baseline: X / s at the norms' outputs (a hook), W * s in the linears' columns (an edit).

Every edit logs what it did per tensor (quantization error, clipped elements) in `session.log`.
"""
from __future__ import annotations

import math

import torch

from outlierlab.interventions.base import EditSession, Intervention
from outlierlab.models.coords import SuperWeight
from outlierlab.quant.rtn import (
    ACTIVATION_GRANULARITIES,
    QuantSpec,
    error_stats,
    fake_quantize,
    fake_quantize_activation,
    spec_from_label,
)
from outlierlab.quant.smoothing import (
    calibrate_input_maxima,
    smoothing_factors,
    smoothing_groups,
)
from outlierlab.quant.targets import check_match, linear_modules


def _summary(tensors: list[dict]) -> dict:
    if not tensors:
        return {"tensors": 0}
    errors = [t["relative_error"] for t in tensors]
    return {"tensors": len(tensors), "mean_relative_error": sum(errors) / len(errors),
            "max_relative_error": max(errors), "max_abs_error": max(t["max_abs_error"] for t in tensors),
            "clipped": sum(t.get("clipped", 0) for t in tensors)}


class QuantizeWeights(Intervention):
    """Fake-quantize the linear weights of the decoder blocks. `block` is the granularity: "128x128" (2-D tiles of
    rows x cols of the (out, in) matrix), "flat16384" (runs of consecutive elements, the SW authors' code), "channel"
    or "tensor" (see quant/rtn.py). `match`: a regex on `layers.{i}.<path>.weight` to restrict which weights,
    e.g. 'mlp\\.down_proj'.

    clip_zscore: clip each quantization group to +-(mean|w| + z std|w|) before its range is taken (the SW authors'
    z-score clipping); restore_super_weights: write the super weights (`session.context.super_weights`) back at
    their values from before quantization."""

    def __init__(self, bits: int = 4, block: str = "128x128", zero_point: str = "min",
                 clip_zscore: float | None = None, restore_super_weights: bool = False, match: str | None = None):
        self._spec = spec_from_label(block, bits, zero_point)
        if clip_zscore is not None and (isinstance(clip_zscore, bool) or not isinstance(clip_zscore, (int, float))
                                        or not clip_zscore > 0 or not math.isfinite(clip_zscore)):
            raise ValueError(f"clip_zscore={clip_zscore} must be a positive number or null")
        if not isinstance(restore_super_weights, bool):
            raise ValueError(f"restore_super_weights={restore_super_weights} must be true or false")
        check_match(match)
        self.bits, self.block, self.zero_point = bits, self._spec.label(), zero_point
        self.clip_zscore, self.restore_super_weights, self.match = clip_zscore, restore_super_weights, match

    @property
    def protocol(self) -> dict:
        granularity = f"per_{self.block}" if self.block in ("channel", "tensor") else f"blocks_{self.block}"
        return {"weights": granularity, "bits": self.bits, "zero_point": self.zero_point,
                "clip_zscore": self.clip_zscore, "restore_super_weights": self.restore_super_weights}

    def apply(self, session: EditSession) -> None:
        protected: dict[tuple, list[tuple[SuperWeight, tuple[int, int]]]] = {}
        if self.restore_super_weights:
            for weight in session.context.super_weights:
                weight = SuperWeight(*weight)
                view = session.sites.super_weight_view(weight)
                view.index(weight.row, weight.col)  # IndexError names a coordinate outside the matrix
                protected.setdefault((id(view.param), view.expert), []).append((weight, (weight.row, weight.col)))
        tensors, restored = [], []
        # Every block matrix, each expert's slice of a fused MoE parameter included (Sites.block_weights).
        for name, view in session.sites.block_weights(self.match):
            original = view.as_out_in()
            quantized, info = fake_quantize(original, self._spec, self.clip_zscore)
            for weight, (row, col) in protected.get((id(view.param), view.expert), []):
                quantized[row, col] = original[row, col]
                restored.append({"super_weight": str(weight), "value": float(original[row, col])})
            tensors.append({"name": name, "numel": original.numel(), **info, **error_stats(original, quantized)})
            session.set(view.param, view.whole, view.stored(quantized))
        session.log.append({"edit": "quantize_weights", "bits": self.bits, "block": self.block,
                            "zero_point": self.zero_point, "clip_zscore": self.clip_zscore,
                            "restored_super_weights": restored, "summary": _summary(tensors), "tensors": tensors})


class QuantizeActivations(Intervention):
    """Dynamic fake quantization of every decoder-block linear's input (per tensor or per token), as a pre-hook.

    holdout=k > 0: the k largest |x| of each group are replaced by its median before quantization and restored after
    (paper SW Sec. 4.1 with k=1: "a single scalar super activation per tensor"). "tensor" is each sequence's
    tensor: a batch of windows is quantized sequence by sequence, as one window at a time would be. The error of
    each input (relative to the float input, over every forward while the hook is on) is logged per linear."""

    def __init__(self, bits: int = 8, granularity: str = "tensor", zero_point: str = "min", holdout: int = 0,
                 match: str | None = None):
        QuantSpec(bits, "tensor", None, zero_point)  # validates bits and zero_point
        if granularity not in ACTIVATION_GRANULARITIES:
            raise ValueError(f"granularity={granularity} is not one of: {', '.join(ACTIVATION_GRANULARITIES)}")
        if not isinstance(holdout, int) or holdout < 0:
            raise ValueError(f"holdout={holdout} must be a non-negative integer")
        check_match(match)
        self.bits, self.granularity, self.zero_point, self.holdout, self.match = (bits, granularity, zero_point,
                                                                                   holdout, match)

    @property
    def protocol(self) -> dict:
        return {"activations": f"per_{self.granularity}", "bits": self.bits, "zero_point": self.zero_point,
                "range": "dynamic", "holdout": self.holdout}

    def apply(self, session: EditSession) -> None:
        stats: dict[str, dict] = {}
        for name, module in linear_modules(session.sites, self.match):
            stats[name] = {"calls": 0, "sum_sq_error": 0.0, "sum_sq": 0.0, "max_abs_error": 0.0, "max_abs_input": 0.0}
            session.add_hook(session.sites.register_linear(name, "in", self._hook(stats[name])))
        session.log.append({"edit": "quantize_activations", "bits": self.bits, "granularity": self.granularity,
                            "zero_point": self.zero_point, "holdout": self.holdout, "inputs": stats})

    def _hook(self, record: dict):
        def hook(x: torch.Tensor):  # [batch, positions, channels] on every family (Sites.register_linear)
            if self.granularity == "tensor" and x.dim() > 2 and x.shape[0] > 1:
                # one range per sequence, as with batch 1: a batched evaluation gives the same numbers
                quantized = torch.cat([fake_quantize_activation(part, self.bits, self.granularity, self.zero_point,
                                                                self.holdout) for part in x.split(1)])
            else:
                quantized = fake_quantize_activation(x, self.bits, self.granularity, self.zero_point, self.holdout)
            diff = (quantized - x).detach().float()
            record["calls"] += 1
            record["sum_sq_error"] += float(diff.pow(2).sum())
            record["sum_sq"] += float(x.detach().float().pow(2).sum())
            record["max_abs_error"] = max(record["max_abs_error"], float(diff.abs().max()))
            record["max_abs_input"] = max(record["max_abs_input"], float(x.detach().abs().max()))
            return quantized
        return hook


class SmoothQuant(Intervention):
    """SmoothQuant's smoothing (alpha = migration strength; 0.5 is its default), calibrated on
    `session.context.calibration_ids` ([n, seqlen] token ids) with the model as it is when applied.

    Exact in float: the norm's output is divided by s (a hook on `layers.{i}.norm1|norm2.out`) and the columns of the
    linears reading it are multiplied by s (an edit). For a norm with a plain gamma this equals SmoothQuant's folding
    of 1/s into gamma; done as a hook it is also right for norms that are not a plain gamma (Gemma's 1 + w)."""

    def __init__(self, alpha: float = 0.5):
        if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha={alpha} must be between 0 and 1")
        self.alpha = float(alpha)

    def apply(self, session: EditSession) -> None:
        ids = session.context.calibration_ids
        if ids is None:
            raise ValueError("SmoothQuant needs calibration data: context.calibration_ids is missing")
        groups = smoothing_groups(session.sites)
        maxima = calibrate_input_maxima(session.loaded, ids, [norm for _, norm, _ in groups])
        factors = {}
        for _, norm, linears in groups:
            columns = torch.stack([view.as_out_in().abs().amax(dim=0).float() for _, view in linears])
            scale = smoothing_factors(maxima[norm], columns.amax(dim=0), self.alpha)
            for _, view in linears:
                scaled = view.as_out_in() * scale.to(view.param.dtype)[None, :]
                session.set(view.param, view.whole, view.stored(scaled))
            session.hook(f"{norm}.out", self._divide(scale))
            factors[norm] = {"linears": [name for name, _ in linears], "input_max": float(maxima[norm].max()),
                             "scale_min": float(scale.min()), "scale_max": float(scale.max()),
                             "smoothed_input_max": float((maxima[norm] / scale).max())}
        session.log.append({"edit": "smoothquant", "alpha": self.alpha, "calibration_windows": int(ids.shape[0]),
                            "calibration_seqlen": int(ids.shape[1]), "norms": factors})

    @staticmethod
    def _divide(scale: torch.Tensor):
        def hook(output: torch.Tensor):
            return output / scale.to(device=output.device, dtype=output.dtype)
        return hook
