"""Content hash of a model's weights: proves an edit was undone bit-exactly."""
from __future__ import annotations

import hashlib

import torch


@torch.no_grad()
def weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
