"""Super-weight coordinates as the papers write them: (layer, row, col) of layers[layer].mlp.down_proj.weight,
row = output (hidden) channel, col = input (intermediate) channel; inside a mixture of experts,
(layer, expert, row, col) of expert `expert`'s slice of the fused down_proj (models/sites.py)."""
from __future__ import annotations

import re
from typing import NamedTuple

_COORD = re.compile(r"^\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*(?:,\s*(\d+)\s*)?\)$")


class SuperWeight(NamedTuple):
    layer: int
    row: int
    col: int
    expert: int | None = None  # an expert of a mixture-of-experts layer (written second: (layer, expert, row, col))

    def __str__(self) -> str:
        return f"({', '.join(map(str, self.coord))})"

    @property
    def coord(self) -> list[int]:
        """As written: [layer, row, col], or [layer, expert, row, col] inside an expert."""
        if self.expert is None:
            return [self.layer, self.row, self.col]
        return [self.layer, self.expert, self.row, self.col]

    @classmethod
    def parse(cls, text) -> "SuperWeight":
        """'(2, 3968, 7003)' or [2, 3968, 7003], or inside an expert '(layer, expert, row, col)' -> SuperWeight."""
        if isinstance(text, str):
            match = _COORD.match(text.strip())
            if not match:
                raise ValueError(f"super weight '{text}' is not of the form '(layer, row, col)' or "
                                 "'(layer, expert, row, col)'")
            values = [int(group) for group in match.groups() if group is not None]
        else:
            values = list(text)
            if len(values) not in (3, 4) or not all(isinstance(v, int) and v >= 0 for v in values):
                raise ValueError(f"super weight {values} is not three non-negative integers (layer, row, col) or "
                                 "four (layer, expert, row, col)")
        return cls(*values) if len(values) == 3 else cls(values[0], values[2], values[3], values[1])


def check_in_shape(weight: SuperWeight, num_layers: int, hidden_size: int, intermediate_size: int,
                   experts: dict[int, tuple[int, int, int]] | None = None) -> None:
    """Raise ValueError naming the coordinate if it does not fit the model's down_proj (or, on a mixture-of-experts
    layer, `experts[layer]` = (experts, rows, cols) of its fused down_proj; experts=None: no layer is known to be
    one, and a coordinate inside an expert is checked only for its layer, its layout being known only after loading,
    as for a GGUF file)."""
    if weight.layer >= num_layers:
        raise ValueError(f"super weight {weight}: layer {weight.layer} is outside the model's {num_layers} layers")
    if experts is None and weight.expert is not None:
        return
    fused = (experts or {}).get(weight.layer)
    if fused is None and weight.expert is not None:
        raise ValueError(f"super weight {weight}: layers.{weight.layer} is not a mixture of experts; write "
                         "(layer, row, col)")
    if fused is not None:
        if weight.expert is None:
            raise ValueError(f"super weight {weight}: layers.{weight.layer} is a mixture of experts; write "
                             "(layer, expert, row, col)")
        count, hidden_size, intermediate_size = fused
        if weight.expert >= count:
            raise ValueError(f"super weight {weight}: expert {weight.expert} is outside layers.{weight.layer}'s "
                             f"{count} experts")
    if weight.row >= hidden_size or weight.col >= intermediate_size:
        raise ValueError(f"super weight {weight}: (row, col) is outside down_proj's shape "
                         f"({hidden_size}, {intermediate_size})")
