"""Asymmetric round-to-nearest (RTN) fake quantization: quantize, then dequantize, in floating point.

As in paper SW (Yu et al. 2024, Sec. 4) and the authors' code (LLMSuperWeight, outliers/functional/quantization.py):
each quantization group X gets its own range from its min and max,

    delta = (max(X) - min(X)) / (2^bits - 1)
    Q(X)  = clamp(round((X - min(X)) / delta), 0, 2^bits - 1)          zero_point="min" (the paper's form)
    X^    = Q(X) * delta + min(X)

or, with zero_point="integer", the common integer zero point z = round(-min(X) / delta) (so that 0 is exact):
Q(X) = clamp(round(X / delta) + z, 0, 2^bits - 1), X^ = (Q(X) - z) * delta. A group whose max equals its min is
returned unchanged (delta = 0). zero_point="symmetric" is signed RTN around 0 (the W8A8 of paper QT's table):
delta = max|X| / (2^(bits-1) - 1), X^ = clamp(round(X / delta), -(2^(bits-1) - 1), 2^(bits-1) - 1) * delta; a group
that is all zeros or holds a non-finite value is returned unchanged. torch.round rounds half to even.

Granularity of a matrix W, addressed as (row = output channel, col = input channel):
    tensor   one group: the whole matrix
    channel  one group per output channel (row)
    block    2-D tiles of block = (rows, cols); edge tiles are smaller when the shape is not a multiple
    flat     groups of `block` consecutive elements of W flattened row-major (the authors' implementation of
             "block size 128x128": 16384 consecutive elements, i.e. whole rows for Llama-7B); the last group is
             smaller when the size is not a multiple

Groups are rows of a [groups, size] tensor padded with NaN; every reduction here ignores the padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GRANULARITIES = ("tensor", "channel", "block", "flat")
ZERO_POINTS = ("min", "integer", "symmetric")


@dataclass(frozen=True)
class QuantSpec:
    """What a quantizer does; invalid values raise ValueError naming the key (checked before any weights load)."""
    bits: int = 4
    granularity: str = "block"
    block: tuple[int, int] | int | None = None  # (rows, cols) for "block"; an element count for "flat"
    zero_point: str = "min"

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"bits={self.bits} must be an integer from 2 to 16")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity} is not one of: {', '.join(GRANULARITIES)}")
        if self.zero_point not in ZERO_POINTS:
            raise ValueError(f"zero_point={self.zero_point} is not one of: {', '.join(ZERO_POINTS)}")
        if self.granularity == "block":
            block = self.block
            if (not isinstance(block, (tuple, list)) or len(block) != 2
                    or not all(isinstance(b, int) and b > 0 for b in block)):
                raise ValueError(f"block={block} must be two positive integers [rows, cols] for granularity=block")
            object.__setattr__(self, "block", (int(block[0]), int(block[1])))
        elif self.granularity == "flat":
            if not isinstance(self.block, int) or self.block <= 0:
                raise ValueError(f"block={self.block} must be a positive integer (elements) for granularity=flat")
        elif self.block is not None:
            raise ValueError(f"block={self.block} is only used with granularity=block or flat, "
                             f"not {self.granularity}")

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    def label(self) -> str:
        if self.granularity == "block":
            return f"{self.block[0]}x{self.block[1]}"
        if self.granularity == "flat":
            return f"flat{self.block}"
        return self.granularity


def spec_from_label(label, bits: int, zero_point: str = "min") -> QuantSpec:
    """"128x128" (2-D block), "flat16384" (flat groups), "channel" or "tensor" -> QuantSpec (ValueError if not)."""
    text = str(label).strip()
    if text in ("tensor", "channel"):
        return QuantSpec(bits, text, None, zero_point)
    if text.startswith("flat") and text[4:].isdigit():
        return QuantSpec(bits, "flat", int(text[4:]), zero_point)
    rows, _, cols = text.partition("x")
    if rows.isdigit() and cols.isdigit():
        return QuantSpec(bits, "block", (int(rows), int(cols)), zero_point)
    raise ValueError(f"block '{label}' is not one of: <rows>x<cols> (e.g. 128x128), flat<N>, channel, tensor")


def _pad_to(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    missing = size - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_full(shape, float("nan"))], dim=dim)


def to_groups(matrix: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, callable]:
    """[rows, cols] -> ([groups, size] NaN-padded, inverse) for the spec's granularity."""
    rows, cols = matrix.shape
    if spec.granularity == "tensor":
        return matrix.reshape(1, -1), lambda g: g.reshape(rows, cols)
    if spec.granularity == "channel":
        return matrix, lambda g: g
    if spec.granularity == "flat":
        size = min(spec.block, matrix.numel())
        count = -(-matrix.numel() // size)
        flat = _pad_to(matrix.reshape(-1), count * size, 0)
        return flat.reshape(count, size), lambda g: g.reshape(-1)[: rows * cols].reshape(rows, cols)
    block_rows, block_cols = min(spec.block[0], rows), min(spec.block[1], cols)
    n_rows, n_cols = -(-rows // block_rows), -(-cols // block_cols)
    padded = _pad_to(_pad_to(matrix, n_rows * block_rows, 0), n_cols * block_cols, 1)
    tiles = padded.reshape(n_rows, block_rows, n_cols, block_cols).permute(0, 2, 1, 3)

    def inverse(groups: torch.Tensor) -> torch.Tensor:
        back = groups.reshape(n_rows, n_cols, block_rows, block_cols).permute(0, 2, 1, 3)
        return back.reshape(n_rows * block_rows, n_cols * block_cols)[:rows, :cols]
    return tiles.reshape(n_rows * n_cols, block_rows * block_cols), inverse


def _group_min_max(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pad = groups.isnan()
    low = groups.masked_fill(pad, float("inf")).amin(dim=1, keepdim=True)
    high = groups.masked_fill(pad, float("-inf")).amax(dim=1, keepdim=True)
    return low, high


def _symmetric_rtn_groups(groups: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2 ** (bits - 1) - 1
    peak = groups.abs().masked_fill(groups.isnan(), 0.0).amax(dim=1, keepdim=True)
    delta = peak / levels
    unchanged = (delta == 0) | ~torch.isfinite(delta)
    safe = torch.where(unchanged, torch.ones_like(delta), delta)
    out = (groups / safe).round().clamp(-levels, levels) * safe
    return torch.where(unchanged, groups, out)


def rtn_groups(groups: torch.Tensor, bits: int, zero_point: str = "min") -> torch.Tensor:
    """RTN quantize-dequantize of each row of `groups` (NaN padding stays NaN): asymmetric from the group's
    min/max, or symmetric around 0 (zero_point="symmetric")."""
    if zero_point == "symmetric":
        return _symmetric_rtn_groups(groups, bits)
    levels = 2 ** bits - 1
    low, high = _group_min_max(groups)
    delta = (high - low) / levels
    flat_group = delta == 0
    safe = torch.where(flat_group, torch.ones_like(delta), delta)
    if zero_point == "min":
        codes = ((groups - low) / safe).round().clamp(0, levels)
        out = codes * safe + low
    else:
        zero = (-low / safe).round().clamp(0, levels)
        codes = ((groups / safe).round() + zero).clamp(0, levels)
        out = (codes - zero) * safe
    return torch.where(flat_group, groups, out)


def zscore_clip_groups(groups: torch.Tensor, zscore: float) -> tuple[torch.Tensor, int]:
    """Clip each group to +-(mean|w| + zscore * std|w|), the authors' z-score clipping (statistics of |w| per
    quantization group, std with Bessel's correction). Returns the clipped groups and how many elements were clipped."""
    magnitude = groups.abs()
    pad = magnitude.isnan()
    count = (~pad).sum(dim=1, keepdim=True).clamp(min=2)
    mean = magnitude.nan_to_num(0.0).sum(dim=1, keepdim=True) / (~pad).sum(dim=1, keepdim=True).clamp(min=1)
    variance = ((magnitude - mean).nan_to_num(0.0) ** 2).sum(dim=1, keepdim=True) / (count - 1)
    threshold = mean + zscore * variance.sqrt()
    clipped = int((magnitude > threshold).sum())
    return torch.maximum(torch.minimum(groups, threshold), -threshold), clipped


def error_stats(original: torch.Tensor, approx: torch.Tensor) -> dict:
    """MSE, max |error| and relative Frobenius error ||W^ - W|| / ||W|| of one tensor."""
    original, approx = original.double(), approx.double()
    diff = approx - original
    norm = float(original.norm())
    return {"mse": float(diff.pow(2).mean()), "max_abs_error": float(diff.abs().max()),
            "relative_error": float(diff.norm()) / norm if norm > 0 else 0.0}


def fake_quantize(matrix: torch.Tensor, spec: QuantSpec, clip_zscore: float | None = None
                  ) -> tuple[torch.Tensor, dict]:
    """Quantize-dequantize a [rows, cols] matrix (rows = output channels); computed in float32 (float64 stays
    float64) and returned in the input's dtype. Returns (dequantized, {"groups", "clipped"})."""
    work = matrix.detach().to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
    groups, inverse = to_groups(work, spec)
    clipped = 0
    if clip_zscore is not None:
        groups, clipped = zscore_clip_groups(groups, clip_zscore)
    out = inverse(rtn_groups(groups, spec.bits, spec.zero_point))
    return out.to(matrix.dtype), {"groups": int(groups.shape[0]), "clipped": clipped}


def fake_quantize_activation(x: torch.Tensor, bits: int, granularity: str = "tensor", zero_point: str = "min",
                             holdout: int = 0) -> torch.Tensor:
    """Dynamic RTN of an activation [..., channels]: one range per tensor ("tensor") or per token ("token").

    holdout = k > 0 is paper SW's super-activation handling: in each group the k largest |x| are replaced by the
    group's median before the range is taken, and put back in full precision after dequantization."""
    shape = x.shape
    work = x.detach().float()
    groups = work.reshape(1, -1) if granularity == "tensor" else work.reshape(-1, shape[-1])
    if holdout:
        k = min(holdout, groups.shape[1])
        index = groups.abs().topk(k, dim=1).indices
        kept = groups.gather(1, index)
        median = groups.median(dim=1, keepdim=True).values
        groups = groups.scatter(1, index, median.expand(-1, k))
        out = rtn_groups(groups, bits, zero_point).scatter(1, index, kept)
    else:
        out = rtn_groups(groups, bits, zero_point)
    return out.reshape(shape).to(x.dtype)


ACTIVATION_GRANULARITIES = ("tensor", "token")
