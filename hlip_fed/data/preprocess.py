"""From a canonical :class:`~hlip_fed.data.volume.Volume` to the model's input tensor.

Steps, as in the HLIP paper and set by :class:`~hlip_fed.config.DataConfig`:

1. intensity to [0, 1]: CT is clipped to the HU window ``ct_window`` (default -40..160, a head window) and
   scaled linearly; every other modality (MR, ...) is clipped to the ``mri_percentiles`` (default
   0.5 and 99.5) of its own voxels and min-max scaled. Percentiles use every voxel, so the result
   does not depend on how the file stored its axes;
2. geometry: with ``fit="crop"`` the volume is resampled to ``target_spacing`` (when set) and
   centre-cropped / zero-padded to ``img_size``; with ``fit="resize"`` the whole field of view is
   interpolated to ``img_size`` in one step (the output spacing then follows from the field of view,
   so ``target_spacing`` is not applied: a second interpolation would only blur);
3. scalar normalisation ``(x - mean) / std``.

Downsampling averages (area interpolation) before any trilinear upsampling, so a 512-pixel slice
reduced to 96 is not aliased. The input is always the canonical array (depth = largest spacing),
which is what makes NIfTI in any orientation and DICOM give the same tensor.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hlip_fed.data.volume import Volume


def scale_intensity(volume: Volume, data_cfg) -> np.ndarray:
    """The volume's intensities mapped to [0, 1] (float32)."""
    a = volume.array
    if volume.modality.upper() == "CT":
        lo, hi = (float(v) for v in data_cfg.ct_window)
    else:
        lo, hi = (float(v) for v in np.percentile(a, list(data_cfg.mri_percentiles)))
    if hi <= lo:  # a constant image: nothing to scale, keep it black rather than divide by zero
        return np.zeros_like(a, dtype=np.float32)
    out = (np.clip(a, lo, hi) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return out.astype(np.float32, copy=False)


def resize(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a [1, 1, D, H, W] tensor: area averaging along shrinking axes, then trilinear."""
    size = [int(s) for s in size]
    shape = list(t.shape[2:])
    if shape == size:
        return t
    down = [min(s, n) for s, n in zip(shape, size)]
    if down != shape:
        t = F.interpolate(t, size=down, mode="area")
    if down != size:
        t = F.interpolate(t, size=size, mode="trilinear", align_corners=False)
    return t


def center_fit(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Centre-crop or zero-pad the last three dims of ``t`` to ``size``."""
    for axis, target in zip(range(-3, 0), size):
        n = t.shape[axis]
        if n > target:
            t = t.narrow(axis, (n - target) // 2, int(target))
        elif n < target:
            before = (target - n) // 2
            pad = [0, 0] * 3
            pad[2 * (-axis - 1)] = before  # F.pad lists the last dim first
            pad[2 * (-axis - 1) + 1] = target - n - before
            t = F.pad(t, pad)
    return t


def unit_intensity(x, data_cfg):
    """Undo step 3: a model input (tensor or array) back on the [0, 1] scale of step 1.

    Analyses that read intensities (a CT value in HU is ``lo + unit * (hi - lo)`` of ``ct_window``)
    must go through this; the normalised values are centred near 0 and are not intensities.
    """
    return x * float(data_cfg.std) + float(data_cfg.mean)


def preprocess(volume: Volume, data_cfg, img_size: Sequence[int]) -> torch.Tensor:
    """The model input for one scan: float32 tensor [1, D, H, W] with ``(D, H, W) == img_size``."""
    img_size = [int(s) for s in img_size]
    t = torch.from_numpy(np.ascontiguousarray(scale_intensity(volume, data_cfg)))[None, None]
    if data_cfg.fit == "resize":
        t = resize(t, img_size)
    else:
        if data_cfg.target_spacing is not None:
            target = [float(s) for s in data_cfg.target_spacing]
            size = [max(1, int(round(n * s / g))) for n, s, g in zip(volume.shape, volume.spacing, target)]
            t = resize(t, size)
        t = center_fit(t, img_size)
    t = (t - float(data_cfg.mean)) / float(data_cfg.std)
    return t[0].contiguous().to(torch.float32)
