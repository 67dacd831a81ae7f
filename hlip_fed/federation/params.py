"""Parameter groups: the named slices of HLIP's state dict that a federation averages.

The default federates the hierarchical vision encoder (patch embedding, CLS token, blocks, norm,
vision projection, and the masked image modelling head of a ``masked`` run), the text projection
and the temperature (plus SigLIP's bias). The text encoder is federated only when it is trained
(``text.lock=false``) and asked for: a locked encoder is the same pretrained file at every site
and never travels.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from hlip_fed.errors import HlipError
from hlip_fed.model.hlip import HLIP

GROUPS: dict[str, tuple[str, ...]] = {
    "vision": ("visual.", "masked."),
    "text_proj": ("text.proj.",),
    "logit": ("logit_scale", "logit_bias"),
    "text_encoder": ("text.encoder.",),
}


# Parameters that stay at each site (``federation.site_local``): never sent, never averaged. "norms"
# are the vision tower's LayerNorm scales and shifts, as FedBN keeps each site's batch norms, so
# that a site's scanner statistics stay its own.
SITE_LOCAL: dict[str, Callable[[str], bool]] = {
    "norms": lambda key: key.startswith("visual.") and key.rsplit(".", 2)[-2].startswith("norm"),
}


def site_local_keys(model: nn.Module, names: Iterable[str]) -> list[str]:
    """State-dict keys of the site-local parameter kinds ``names``, in state-dict order."""
    unknown = [n for n in names if n not in SITE_LOCAL]
    if unknown:
        raise HlipError(f"federation.site_local: unknown kind {unknown[0]!r} (known: {', '.join(SITE_LOCAL)})")
    return [k for k in model.state_dict() if any(SITE_LOCAL[n](k) for n in names)]


def federated_keys(model: nn.Module, groups: list[str], site_local: Iterable[str] = ()) -> list[str]:
    """State-dict keys of ``groups`` in ``model``, in state-dict order, without the site-local ones."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise HlipError(f"federation.groups: unknown group {unknown[0]!r} (known: {', '.join(GROUPS)})")
    if "text_encoder" in groups and getattr(model, "cfg", None) is not None and model.cfg.text.lock:
        raise HlipError("federation.groups: text_encoder is locked (model.text.lock=true) and is never sent")
    prefixes = tuple(p for g in groups for p in GROUPS[g])
    local = set(site_local_keys(model, site_local))
    keys = [k for k in model.state_dict() if k.startswith(prefixes) and k not in local]
    if not keys:
        raise HlipError(f"federation.groups {groups} select no weights of the model")
    return keys


def get_arrays(model: nn.Module, keys: list[str]) -> "OrderedDict[str, torch.Tensor]":
    """Detached fp32 copies of the federated tensors (what a site sends)."""
    state = model.state_dict()
    return OrderedDict((k, state[k].detach().to("cpu", torch.float32).clone()) for k in keys)


def set_arrays(model: nn.Module, arrays: dict[str, torch.Tensor]) -> None:
    """Load global tensors into the local copy; every key must exist with the same shape."""
    state = model.state_dict()
    for k, v in arrays.items():
        if k not in state:
            raise HlipError(f"global weights hold {k!r}, which this model does not have")
        if tuple(state[k].shape) != tuple(v.shape):
            raise HlipError(f"global weight {k!r} has shape {tuple(v.shape)}, model expects {tuple(state[k].shape)}")
    with torch.no_grad():
        for k, v in arrays.items():
            state[k].copy_(torch.as_tensor(v, dtype=state[k].dtype))


def text_tower_hash(model: nn.Module) -> str:
    """SHA-256 of the text encoder's weights: a locked text tower never travels, so every site must
    build the same one (the server sends its hash with each message; a site with another refuses)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if key.startswith(GROUPS["text_encoder"]):
            digest.update(key.encode())
            digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def start_from(model: nn.Module, folder: str, keys: list[str]) -> None:
    """Set ``model``'s federated tensors (``keys``) from a saved model folder (``federation.init``).

    The rest of the model (a locked text encoder) is what the config builds at every site, so the
    folder's text model must be the config's."""
    initial = HLIP.from_pretrained(folder)
    ours, theirs = getattr(model, "cfg", None), initial.cfg
    if ours is not None and (ours.text.name != theirs.text.name or ours.vision.pos_embed != theirs.vision.pos_embed):
        raise HlipError(f"federation.init {folder}: its text model {theirs.text.name} and position embeddings "
                        f"({theirs.vision.pos_embed}) must be the run's ({ours.text.name}, {ours.vision.pos_embed}); "
                        f"set model.vision.pos_embed and model.text.name to match")
    state = initial.state_dict()
    missing = [k for k in keys if k not in state]
    if missing:
        raise HlipError(f"federation.init {Path(folder).name}: the model has no {missing[0]!r}")
    set_arrays(model, {k: state[k] for k in keys})


def count_bytes(arrays: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in arrays.values())
