"""Image augmentation of training studies at their site: MONAI transforms, composed per preset.

A study is augmented as a whole, its scans stacked as channels: one random spatial transform moves
every scan (they show one head in one session), and one scanner draw (bias field, gamma, noise,
...) acts on all of them. Transforms work on the [0, 1] intensity scale (background 0, what
padding adds), between undoing and redoing the model's scalar normalisation. A left-right mirror
also swaps the sides named in the report, so image and text keep agreeing.

Presets (``data.augment``); ranges follow HLIP's description, SynthSeg's and nnU-Net's defaults:

* ``none``: the study as preprocessed.
* ``light``: left-right mirror (p 0.5, laterality words swapped); a random affine (p 0.8):
  rotation up to 15 degrees about each axis, scaling by up to 10 %, translation up to 5 % of the
  field of view (HLIP's random crop and scale); intensity jitter: brightness x0.9-1.1 (p 0.5).
* ``rigid``: ``light`` without its scaling: the mirror, a rigid movement (p 0.8: rotation up to
  15 degrees about each axis, translation up to 5 %) and the brightness jitter. The scans are
  resampled to a fixed spacing, so a head's size is the patient's, and a size-read trait such as
  atrophy stays what the report says.
* ``scanner``: the mirror; one warp (p 0.8): the affine (rotation 15 degrees, scaling 15 %,
  translation 5 %), combined in one in eight warps with an elastic deformation (a random field
  smoothed by a Gaussian of 5-7 voxels: displacements of about 1 voxel RMS, up to 2; dense 3D
  elastic warps are the costliest transform, docs/benchmarks.md); then scanner randomisation, each
  with nnU-Net's ranges: a smooth multiplicative bias field (p 0.3), gamma 0.7-1.5 (p 0.3),
  contrast x0.75-1.25 about the mean (p 0.15), brightness x0.75-1.25 (p 0.15), Gaussian noise with
  a standard deviation up to 0.05 of the range (p 0.15), Gaussian blur of 0.5-1 voxel (p 0.2) and
  simulated low resolution (down to half, p 0.25).
* ``intensity``: ``scanner`` without the warp: the mirror and the scanner randomisation only, so
  a structure keeps its size and place (a whole-brain trait such as atrophy is read from sizes).

Randomness comes from one seed per study drawn from torch's generator, so a seeded round (and a
DataLoader worker, which torch seeds) is reproducible.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import get_args, get_type_hints

import torch
from monai.data import set_track_meta
from monai.transforms import (
    Compose,
    Flip,
    Identityd,
    MapTransform,
    OneOf,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    RandomizableTransform,
)

from hlip_fed.config import DataConfig
from hlip_fed.data.preprocess import normalize, unit_intensity

PRESETS = get_args(get_type_hints(DataConfig)["augment"])  # none first
_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_SPATIAL = ("image", "mask")


def swap_sides(text: str) -> str:
    """``text`` with every "left" and "right" exchanged (keeping their case), as a mirrored image
    needs its report to read."""

    def other(match: re.Match) -> str:
        word = match.group(0)
        new = "right" if word.lower() == "left" else "left"
        return new.upper() if word.isupper() else new.capitalize() if word[0].isupper() else new

    return _SIDE.sub(other, text)


class RandLateralFlipd(RandomizableTransform, MapTransform):
    """Mirror a study left-right with probability ``prob``: each channel of ``image`` (and of
    ``mask``, when present) along its own left-right axis (``lr_axes``, one per channel, spatial
    axis numbers), and the sides named in ``report`` exchanged."""

    def __init__(self, prob: float = 0.5):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, _SPATIAL, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        axes = list(d["lr_axes"])
        for key in self.key_iterator(d):
            x = d[key]
            d[key] = torch.stack([Flip(spatial_axis=axes[min(i, len(axes) - 1)])(x[i : i + 1])[0] for i in range(x.shape[0])])
        d["report"] = swap_sides(str(d["report"]))
        return d


def _affine_ranges(rotate_deg: float, scale: float, translate: float, size: Sequence[int]) -> dict:
    rad = math.radians(rotate_deg)
    return {"rotate_range": (rad, rad, rad), "scale_range": (scale, scale, scale),
            "translate_range": tuple(translate * n for n in size)}


def _preset(name: str, size: Sequence[int]) -> list:
    modes = {"mode": ("bilinear", "nearest"), "padding_mode": "zeros", "allow_missing_keys": True}
    if name in ("light", "rigid"):
        scale = 0.10 if name == "light" else 0.0
        return [
            RandLateralFlipd(prob=0.5),
            RandAffined(_SPATIAL, prob=0.8, **_affine_ranges(15.0, scale, 0.05, size), **modes),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
        ]
    if name == "scanner":
        affine = _affine_ranges(15.0, 0.15, 0.05, size)
        return [
            RandLateralFlipd(prob=0.5),
            OneOf([Rand3DElasticd(_SPATIAL, sigma_range=(5.0, 7.0), magnitude_range=(50.0, 150.0), prob=1.0,
                                  **affine, **modes),
                   RandAffined(_SPATIAL, prob=1.0, **affine, **modes),
                   Identityd(_SPATIAL, allow_missing_keys=True)], weights=(0.1, 0.7, 0.2)),
            *_scanner_intensities(),
        ]
    if name == "intensity":
        return [RandLateralFlipd(prob=0.5), *_scanner_intensities()]
    return []


def _scanner_intensities() -> list:
    """What a scanner adds to the voxel values, with nnU-Net's ranges; no voxel moves."""
    return [
        RandBiasFieldd("image", coeff_range=(0.0, 0.3), prob=0.3),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
        RandScaleIntensityFixedMeand("image", factors=0.25, prob=0.15),
        RandScaleIntensityd("image", factors=0.25, prob=0.15),
        RandGaussianNoised("image", std=0.05, prob=0.15),
        RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
        RandSimulateLowResolutiond("image", zoom_range=(0.5, 1.0), prob=0.25),
    ]


class StudyAugmentation:
    """``data.augment``'s preset as a callable on one preprocessed study.

    ``(scans [N, 1, D, H, W] normalised, report, lr_axes) -> (scans, report)``; with ``mask``
    (``[N or 1, D, H, W]``, e.g. a truth label map) it also returns the mask moved like the image.
    """

    def __init__(self, name: str, data_cfg, img_size: Sequence[int]):
        if name not in PRESETS:
            raise ValueError(f"unknown augmentation preset {name!r} (use {', '.join(PRESETS)})")
        set_track_meta(False)  # plain tensors out of MONAI: the metadata is not used here
        self.name, self.data_cfg = name, data_cfg
        self.transforms = _preset(name, [int(s) for s in img_size])
        self.compose = Compose(self.transforms)

    def __bool__(self) -> bool:
        return bool(self.transforms)

    def __call__(self, scans: torch.Tensor, report: str, lr_axes: Sequence[int], mask: torch.Tensor | None = None,
                 seed: int | None = None):
        if not self.transforms:
            return (scans, report) if mask is None else (scans, report, mask)
        self.compose.set_random_state(seed=int(torch.randint(2**31 - 1, ()).item()) if seed is None else seed)
        d = {"image": unit_intensity(scans[:, 0], self.data_cfg), "report": report, "lr_axes": list(lr_axes)}
        if mask is not None:
            d["mask"] = mask.float()
        d = self.compose(d)
        out = normalize(torch.as_tensor(d["image"], dtype=torch.float32), self.data_cfg)[:, None].contiguous()
        if mask is None:
            return out, d["report"]
        return out, d["report"], torch.as_tensor(d["mask"]).round().to(mask.dtype)
