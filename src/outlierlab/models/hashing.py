"""Content hash of a model's weights: proves an edit was undone bit-exactly."""
from __future__ import annotations

import hashlib

import torch

from outlierlab.models import offload


@torch.no_grad()
def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every state-dict tensor by name; an offloaded one is read from its store with its edits
    (models/offload.py), one tensor at a time, so the hash equals the in-memory model's."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        digest.update(name.encode())
        digest.update(offload.values(tensor).detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
