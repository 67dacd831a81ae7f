"""HLIP's released checkpoints: reading them, and their keys mapped to this model's and back.

Formats read: open_clip training checkpoints (``{"epoch", "name", "state_dict", ...}``, every key
prefixed ``module.``), plain state dicts (``.pt``/``.bin``, with or without the prefix) and
safetensors. Keys (open_clip's CustomTextCLIP around a timm ViT) and this model's names:

    visual.trunk.cls_token                 [1, 1, C]          visual.cls_token
    visual.trunk.patch_embed.proj.*        [C, 1, pd, ph, pw]  visual.patch_embed.proj.*
    visual.trunk.spatial_posemb            [1, gd, gh, gw, C] visual.pos_spatial [gd, gh, gw, C]
    visual.trunk.sequential_posemb         [1, S, C]          visual.pos_scan [S, C]
      (older checkpoints: series_posemb)
    visual.trunk.blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*   visual.blocks.{i}.*
    visual.trunk.norm.*                                       visual.norm.*
    visual.head.proj.weight                [E, C]             visual.proj.weight
    text.transformer.*                     (a BERT)           text.encoder.*
    text.proj.weight                       [E, hidden]        text.proj.weight
    logit_scale, logit_bias                                   the same

The position embeddings of released weights are stored (derived from MAE's 2D embedding plus a
depth sin-cos), so an imported model uses ``model.vision.pos_embed: stored``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hlip_fed.config import load_config
from hlip_fed.errors import HlipError
from hlip_fed.model.factory import create_model, load_pretrained
from hlip_fed.model.pos_embed import sincos_1d

# (official prefix, this model's prefix); the first match wins.
PREFIXES = (
    ("visual.trunk.cls_token", "visual.cls_token"),
    ("visual.trunk.patch_embed.", "visual.patch_embed."),
    ("visual.trunk.spatial_posemb", "visual.pos_spatial"),
    ("visual.trunk.sequential_posemb", "visual.pos_scan"),
    ("visual.trunk.series_posemb", "visual.pos_scan"),
    ("visual.trunk.blocks.", "visual.blocks."),
    ("visual.trunk.norm.", "visual.norm."),
    ("visual.head.proj.", "visual.proj."),
    ("text.transformer.", "text.encoder."),
    ("text.proj.", "text.proj."),
    ("logit_scale", "logit_scale"),
    ("logit_bias", "logit_bias"),
)
# Official tensors this model does not use: BERT's pooler (HLIP pools the CLS token's final state)
# and the position-id buffer older transformers versions saved.
UNUSED = ("text.transformer.pooler.", "text.transformer.embeddings.position_ids")
# Official tensors with a leading batch axis that this model does not keep.
BATCHED = ("visual.trunk.spatial_posemb", "visual.trunk.sequential_posemb", "visual.trunk.series_posemb")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint of any released format (its ``state_dict`` or ``model``
    entry for a training checkpoint), ``module.`` removed."""
    path = Path(path)
    if not path.is_file():
        raise HlipError(f"{path}: checkpoint not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            # weights_only: a checkpoint is data, and unpickling arbitrary objects would run code.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear line
        raise HlipError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0][:200]})") from None
    for wrapper in ("state_dict", "model"):  # open_clip's and MAE's training checkpoints
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state:
        raise HlipError(f"{path}: holds no state dict")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise HlipError(f"{path}: {bad!r} is not a tensor")
    return state


def to_local(official: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Official keys -> this model's keys; an unknown key is refused by name."""
    out = {}
    for key, value in official.items():
        if key.startswith(UNUSED):
            continue
        local = next((ours + key[len(theirs):] for theirs, ours in PREFIXES if key.startswith(theirs)), None)
        if local is None:
            raise HlipError(f"{source}: key {key!r} has no place in an hlip-fed model")
        out[local] = value[0] if key in BATCHED else value
    return out


def to_official(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This model's keys -> the official layout (the inverse of :func:`to_local`)."""
    out = {}
    for key, value in local.items():
        theirs = next((t + key[len(o):] for t, o in PREFIXES if key.startswith(o) and "series" not in t), None)
        if theirs is None:
            raise HlipError(f"{key!r} has no place in HLIP's checkpoint layout")
        out[theirs] = value[None] if theirs in BATCHED and value is not None else value
    return out


def load_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], required: tuple[str, ...],
              source: str, name=lambda key: next(iter(to_official({key: None})))) -> None:
    """Copy ``weights`` into ``model`` after checking,
    with the checkpoint's own key names in the errors, that every key exists with its shape and that
    every model key under a ``required`` prefix is given (nothing is left at its initial value)."""
    state = model.state_dict()
    for key, value in weights.items():
        theirs = name(key)  # errors name the checkpoint's own key
        if key not in state:
            raise HlipError(f"{source}: {theirs!r} has no place in this preset's model")
        if tuple(value.shape) != tuple(state[key].shape):
            raise HlipError(f"{source}: {theirs!r} has shape {list(value.shape)}; the preset needs "
                            f"{list(state[key].shape)}")
    missing = [k for k in state if k.startswith(required) and k not in weights]
    if missing:
        raise HlipError(f"{source}: no weights for {missing[0]!r}" + (f" and {len(missing) - 1} more"
                                                                     if len(missing) > 1 else ""))
    model.load_state_dict(weights, strict=False)


def import_checkpoint(checkpoint: str | Path, preset: str, out: str | Path, text_dir: str | Path | None = None,
                      overrides: list[str] | None = None) -> Path:
    """An HLIP checkpoint as a saved hlip-fed model folder (``hlip-fed model import`` adds its card).

    Without ``text_dir`` only the vision tower (and the temperature) is imported and the preset's
    text tower is kept; with it, ``text_dir`` is a local BERT folder (config and tokenizer) that
    receives the checkpoint's text weights (CLS pooling, linear projection, as HLIP's).
    """
    official = read_checkpoint(checkpoint)
    weights = to_local(official, str(checkpoint))
    extra = ["model.vision.pos_embed=stored", "model.text.proj=linear"]
    if "logit_bias" in weights:
        extra.append("model.loss.name=siglip")
    if text_dir is not None:
        if not (Path(text_dir) / "config.json").is_file():
            raise HlipError(f"{text_dir}: not a text model folder (config.json is missing)")
        extra += [f"model.text.name={Path(text_dir).resolve()}", "model.text.pooling=cls", "model.text.pretrained=false"]
    else:
        weights = {k: v for k, v in weights.items() if not k.startswith("text.")}
    cfg = load_config(preset, overrides=extra + list(overrides or []))
    if cfg.model.vision.stem != "patch":
        raise HlipError("HLIP's checkpoints hold a single-convolution patch embedding: use model.vision.stem=patch")
    model = create_model(cfg.model, seed=0)
    required = ("visual.", "logit_scale") + (("text.",) if text_dir is not None else ())
    load_into(model, weights, required, str(checkpoint))
    out = model.save_pretrained(out)
    if text_dir is not None:  # a complete text model folder, for the sites' model.text.name
        model.text.encoder.save_pretrained(str(out / "text"))
    return out


def export_model(model_dir: str | Path, out: str | Path, fmt: str = "open_clip", vision_only: bool = False) -> Path:
    """A saved hlip-fed model in HLIP's layout: an open_clip checkpoint (``.pt``, ``module.`` keys)
    or a plain safetensors state dict. A text tower HLIP's layout cannot hold needs ``vision_only``."""
    model, _ = load_pretrained(model_dir)
    state = model.state_dict()
    text = model.text.encoder.config
    if not vision_only and (text.model_type != "bert" or text.hidden_size != 768 or model.cfg.text.proj != "linear"
                            or model.cfg.text.pooling != "cls"):
        raise HlipError(f"{model_dir}: HLIP's layout holds a BERT-base text tower (768 wide, CLS pooling, linear "
                        f"projection), not this one ({model.cfg.text.name}); use --vision-only")
    keep = ("visual.", "logit_scale", "logit_bias") + (() if vision_only else ("text.",))
    local = {k: v for k, v in state.items() if k.startswith(keep)}
    if model.cfg.vision.pos_embed != "stored":  # HLIP's layout always stores them
        local["visual.pos_spatial"] = model.visual.pos_spatial
        local["visual.pos_scan"] = model.visual.pos_scan
    official = {k: v.detach().clone().contiguous() for k, v in to_official(local).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file(official, str(out))
    elif fmt == "open_clip":
        torch.save({"epoch": 0, "name": Path(model_dir).name,
                    "state_dict": {f"module.{k}": v for k, v in official.items()}}, out)
    else:
        raise HlipError(f"--format must be open_clip or safetensors, not {fmt!r}")
    return out


def inflate_2d(checkpoint: str | Path, preset: str, out: str | Path, overrides: list[str] | None = None) -> Path:
    """A 2D ViT's weights (timm names: ``cls_token``, ``pos_embed`` [1, 1 + h*w, C], a 3-channel
    ``patch_embed.proj``, ``blocks.*``, ``norm.*``) inflated to a 3D HLIP preset, as HLIP starts its
    training from MAE's ImageNet ViT: the patch kernel resized in-plane (bicubic), summed over RGB,
    repeated along depth and divided by the depth patch size; the 2D position embedding resampled
    in-plane (bicubic) plus a 1D depth sin-cos, stored; the CLS position folded into the CLS token.
    The projection heads, the temperature and the text tower stay the preset's."""
    state = read_checkpoint(checkpoint)
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise HlipError(f"{checkpoint}: no {key!r}; not a timm ViT state dict")
    cfg = load_config(preset, overrides=["model.vision.pos_embed=stored", *(overrides or [])])
    v = cfg.model.vision
    pd, ph, pw = v.patch_size
    gd, gh, gw = (s // p for s, p in zip(v.img_size, v.patch_size))
    pos = state["pos_embed"][0]
    cls = state["cls_token"].reshape(1, 1, -1)
    side = math.isqrt(pos.shape[0])
    if side * side != pos.shape[0]:  # the first position is the CLS token's: fold it in
        cls, pos = cls + pos[:1][None], pos[1:]
        side = math.isqrt(pos.shape[0])
    width = pos.shape[-1]
    grid2d = pos.reshape(1, side, side, width).permute(0, 3, 1, 2)
    if (side, side) != (gh, gw):
        grid2d = F.interpolate(grid2d, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
    depth = sincos_1d(width, torch.arange(gd))
    kernel = state["patch_embed.proj.weight"]
    if tuple(kernel.shape[2:]) != (ph, pw):
        kernel = F.interpolate(kernel, size=(ph, pw), mode="bicubic", align_corners=False)
    weights = {
        "visual.cls_token": cls,
        "visual.pos_spatial": depth[:, None, None, :] + grid2d[0].permute(1, 2, 0)[None],
        "visual.pos_scan": sincos_1d(width, torch.arange(v.max_scans)),
        "visual.patch_embed.proj.weight": kernel.sum(1, keepdim=True)[:, :, None].repeat(1, 1, pd, 1, 1) / pd,
        "visual.patch_embed.proj.bias": state.get("patch_embed.proj.bias", torch.zeros(kernel.shape[0])),
    }
    for key, value in state.items():
        if key.startswith(("blocks.", "norm.")):
            weights[f"visual.{key}"] = value
    model = create_model(cfg.model, seed=0)
    load_into(model, weights, ("visual.blocks.", "visual.norm.", "visual.patch_embed.", "visual.cls_token",
                               "visual.pos_"), str(checkpoint), name=lambda key: key.removeprefix("visual."))
    return model.save_pretrained(out)
