"""Attaching a function at a module's input or output: the low-level hook primitive under `Sites.register`."""
from __future__ import annotations

from torch import nn


def first_tensor(output):
    """Decoder blocks return a tensor in new transformers and a tuple in older/other ones."""
    return output[0] if isinstance(output, (tuple, list)) else output


def attach(module: nn.Module, point: str, fn):
    """fn(tensor) at a module's first input ("in") or output ("out"); a returned tensor replaces it."""
    if point == "in":
        def pre_hook(_module, args):
            replaced = fn(args[0])
            return None if replaced is None else (replaced, *args[1:])
        return module.register_forward_pre_hook(pre_hook)

    def post_hook(_module, _args, output):
        replaced = fn(first_tensor(output))
        if replaced is None:
            return None
        return (replaced, *output[1:]) if isinstance(output, tuple) else replaced
    return module.register_forward_hook(post_hook)


class Handles:
    """Several hook handles removed as one."""

    def __init__(self, handles):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
