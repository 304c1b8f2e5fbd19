"""Fingerprints: short names for "the same update" and "the same model", used to key caches and to refuse
mixing results of different runs (sweeps, generations, unsteered answers)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch
from torch import nn


def update_fingerprint(update: nn.Module) -> str:
    """sha256 (hex) of an update's spec and parameter values: two updates with one fingerprint act alike."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(update.spec), sort_keys=True, default=str).encode())
    for name, tensor in sorted(update.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """Model id, config hash and a probe of the first and last weights, so that two checkpoints of one
    architecture (or two random initialisations) never share a cache."""
    from .models import config_hash, model_id

    params = list(model.parameters())
    digest = hashlib.sha256()
    for tensor in (params[0], params[-1]):
        digest.update(tensor.detach().reshape(-1)[:256].to("cpu", torch.float32).numpy().tobytes())
    return {"model_id": model_id(model), "config_hash": config_hash(model), "weights_probe": digest.hexdigest()[:16]}
