"""Super-weight coordinates as the papers write them: (layer, row, col) of layers[layer].mlp.down_proj.weight,
row = output (hidden) channel, col = input (intermediate) channel."""
from __future__ import annotations

import re
from typing import NamedTuple

_COORD = re.compile(r"^\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)$")


class SuperWeight(NamedTuple):
    layer: int
    row: int
    col: int

    def __str__(self) -> str:
        return f"({self.layer}, {self.row}, {self.col})"

    @classmethod
    def parse(cls, text) -> "SuperWeight":
        """'(2, 3968, 7003)' or [2, 3968, 7003] -> SuperWeight."""
        if isinstance(text, str):
            match = _COORD.match(text.strip())
            if not match:
                raise ValueError(f"super weight '{text}' is not of the form '(layer, row, col)'")
            return cls(*(int(group) for group in match.groups()))
        values = list(text)
        if len(values) != 3 or not all(isinstance(v, int) and v >= 0 for v in values):
            raise ValueError(f"super weight {values} is not three non-negative integers (layer, row, col)")
        return cls(*values)


def check_in_shape(weight: SuperWeight, num_layers: int, hidden_size: int, intermediate_size: int) -> None:
    """Raise ValueError naming the coordinate if it does not fit the model's down_proj."""
    if weight.layer >= num_layers:
        raise ValueError(f"super weight {weight}: layer {weight.layer} is outside the model's {num_layers} layers")
    if weight.row >= hidden_size or weight.col >= intermediate_size:
        raise ValueError(f"super weight {weight}: (row, col) is outside down_proj's shape "
                         f"({hidden_size}, {intermediate_size})")
