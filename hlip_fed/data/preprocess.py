"""From a canonical :class:`~hlip_fed.data.volume.Volume` to the model's input tensor.

Geometry is done in physical units (Hounsfield units, raw MR signal) and intensities are mapped
afterwards: a window applied before interpolation would turn the edge between saturated bone and
brain into a band of voxels at the value of fresh blood. The steps, set by
:class:`~hlip_fed.config.DataConfig`:

1. CT bone (``ct_bone_hu``): voxels above that many HU, and their face neighbours (the
   partial-volume rim, where a few percent of bone already lifts brain to blood's density), are set
   to the window's lower bound, so the skull reads as background rather than as the brightest
   structure of the head. MR bias field (``mri_bias_correction``): N4 (SimpleITK) fits the
   scanner's smooth multiplicative field inside an Otsu head mask on a copy shrunk to about 8 mm
   voxels, and the scan is divided by it at full resolution.
2. geometry, :func:`to_model_grid`: with ``fit="resize"`` the whole field of view is resampled to
   ``img_size``; with ``fit="crop"`` the scan is sampled at ``target_spacing`` on an ``img_size``
   grid that shares its centre (without a target spacing it is centre-cropped / padded as it is).
   Resampling matches resolution: along every axis whose output spacing is coarser than the
   input's, a Gaussian filter first widens the point spread (taken as a Gaussian whose FWHM is the
   voxel spacing) to the output spacing, then trilinear interpolation samples it. Two scanners
   resampled to one spacing are therefore equally sharp and, whatever their grids, aligned.
3. intensity to [0, 1]: CT is clipped to the HU window ``ct_window`` and scaled linearly; every
   other modality is clipped to the ``mri_percentiles`` of its own voxels and min-max scaled, or
   with ``mri_scale: foreground`` scaled from its lower percentile so that its head's median is 0.5;
   what lies outside the scan's field of view is 0.
4. scalar normalisation ``(x - mean) / std``.

The input is always the canonical array (depth = largest spacing), which is what makes NIfTI in
any orientation and DICOM give the same tensor; :func:`lr_axis` says which of its axes runs
left-right, for augmentations that mirror a study.
"""

from __future__ import annotations

import math
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from hlip_fed.data.errors import DataError
from hlip_fed.data.volume import Volume

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def suppress_bone(volume: Volume, data_cfg) -> np.ndarray:
    """The scan's array with CT bone (and its partial-volume rim) set to the window's lower bound."""
    a = volume.array
    if volume.modality.upper() != "CT" or data_cfg.ct_bone_hu is None:
        return a
    bone = ndimage.binary_dilation(a > float(data_cfg.ct_bone_hu))
    out = a.copy()
    out[bone] = float(data_cfg.ct_window[0])
    return out


# N4 on voxels of about this size (mm): the field is smooth over centimetres, and the fit's cost
# falls with the number of voxels (0.4 s for a 36 x 104 x 104 scan on one core).
N4_VOXEL_MM = 8.0
N4_ITERATIONS = (20, 20, 20)  # per fitting level; three levels refine the B-spline control grid


def correct_bias_field(a: np.ndarray, volume: Volume, data_cfg) -> np.ndarray:
    """``a`` divided by the MR scanner's bias field as N4 estimates it; other modalities as they are.

    A scan with nothing to fit (no voxel above Otsu's threshold) is returned as it is.
    """
    if volume.modality.upper() != "MR" or not data_cfg.mri_bias_correction or not np.ptp(a) > 0:
        return a
    import SimpleITK as sitk  # only sites that turn the correction on pay for the import

    img = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))
    img.SetSpacing([float(s) for s in volume.spacing[::-1]])  # SimpleITK's axes are (x, y, z) = (W, H, D)
    mask = sitk.OtsuThreshold(img, 0, 1, 200)
    shrink = [max(1, round(N4_VOXEL_MM / float(s))) for s in volume.spacing[::-1]]
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(N4_ITERATIONS))
    try:
        n4.Execute(sitk.Shrink(img, shrink), sitk.Shrink(mask, shrink))
        log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img))
    except RuntimeError as exc:
        raise DataError(volume.source, f"N4 bias field correction failed: {str(exc).strip().splitlines()[-1]}")
    return (a / np.exp(log_field)).astype(np.float32)


# With ``mri_scale: foreground``, the head's median sits this far up the [0, 1] range: 0.5, so the
# brightest MR tissue (T2 CSF, enhancing tumour, FLAIR oedema: 1.7-2.2x the median) reaches about 1.
FOREGROUND_MEDIAN_AT = 0.5


def head_median(a: np.ndarray) -> float:
    """Median of the voxels of ``a`` above Otsu's threshold (the head, not the air around it)."""
    import SimpleITK as sitk  # only MR scans scaled to their foreground pay for the import

    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32)))
    head = a[a > otsu.GetThreshold()]
    return float(np.median(head if head.size else a))


def intensity_range(a: np.ndarray, modality: str, data_cfg) -> tuple[float, float]:
    """The values that step 3 maps to 0 and 1: the CT window, or for MR the percentiles of ``a``
    (``mri_scale: percentiles``) or its lower percentile and the value that puts its head's median
    at :data:`FOREGROUND_MEDIAN_AT` (``foreground``)."""
    if modality.upper() == "CT":
        return float(data_cfg.ct_window[0]), float(data_cfg.ct_window[1])
    lo, hi = (float(v) for v in np.percentile(a, list(data_cfg.mri_percentiles)))
    if data_cfg.mri_scale == "foreground" and hi > lo:
        hi = lo + (head_median(a) - lo) / FOREGROUND_MEDIAN_AT
    return lo, hi


def scale_intensity(a: np.ndarray | torch.Tensor, lo: float, hi: float) -> np.ndarray | torch.Tensor:
    """``a`` clipped to [lo, hi] and mapped linearly to [0, 1] (all 0 when ``hi <= lo``: a constant
    image stays black rather than dividing by zero)."""
    if hi <= lo:
        return a * 0
    return (a.clip(lo, hi) - lo) * (1.0 / (hi - lo))


def output_spacing(shape: Sequence[int], spacing: Sequence[float], data_cfg,
                   img_size: Sequence[int]) -> list[float] | None:
    """The model input's voxel spacing for a scan of ``shape`` and ``spacing``: the field of view
    over ``img_size`` (``fit="resize"``), ``target_spacing`` (``fit="crop"``), or ``None`` for a
    plain crop at the scan's own spacing."""
    if data_cfg.fit == "resize":
        return [n * s / m for n, s, m in zip(shape, spacing, img_size)]
    if data_cfg.target_spacing is None:
        return None
    return [float(g) for g in data_cfg.target_spacing]


def match_resolution(t: torch.Tensor, spacing: Sequence[float], out_spacing: Sequence[float]) -> torch.Tensor:
    """Gaussian-filter a [1, 1, D, H, W] tensor along every axis whose ``out_spacing`` is coarser
    than ``spacing``, so that its resolution (FWHM taken as the voxel spacing) becomes the output's."""
    sigma = [math.sqrt(max(o * o - s * s, 0.0)) / FWHM_PER_SIGMA / s for s, o in zip(spacing, out_spacing)]
    if not any(sg > 0 for sg in sigma):
        return t
    return torch.from_numpy(ndimage.gaussian_filter(t[0, 0].numpy(), sigma, mode="nearest"))[None, None]


def sample_centred(t: torch.Tensor, spacing: Sequence[float], out_spacing: Sequence[float],
                   size: Sequence[int]) -> torch.Tensor:
    """Sample a [1, 1, D, H, W] tensor with voxel ``spacing`` on a grid of ``size`` voxels of
    ``out_spacing`` that shares its centre (trilinear; 0 outside the tensor's field of view)."""
    if list(t.shape[2:]) == [int(m) for m in size] and all(math.isclose(g, s) for s, g in zip(spacing, out_spacing)):
        return t  # the scan is already on that grid
    axes = []
    for n, s, g, m in zip(t.shape[2:], spacing, out_spacing, size):
        index = (n - 1) / 2.0 + (torch.arange(int(m), dtype=torch.float64) - (int(m) - 1) / 2.0) * (g / s)
        axes.append((2.0 * index + 1.0) / n - 1.0)  # grid_sample's coordinates (align_corners=False)
    zd, yh, xw = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([xw, yh, zd], dim=-1)[None].to(t.dtype)  # grid_sample takes (x, y, z) = (W, H, D)
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resize(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a [1, 1, D, H, W] map: area averaging along shrinking axes, then trilinear."""
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


def to_model_grid(t: torch.Tensor, spacing: Sequence[float], data_cfg, img_size: Sequence[int],
                  background: float = 0.0) -> torch.Tensor:
    """Step 2 for a [1, 1, D, H, W] tensor on a scan's grid (a scan, or a truth mask that must
    follow it); outside the scan's field of view the result is ``background``."""
    img_size = [int(s) for s in img_size]
    out_spacing = output_spacing(t.shape[2:], spacing, data_cfg, img_size)
    if out_spacing is None:
        return center_fit(t - background, img_size) + background
    t = match_resolution(t, spacing, out_spacing)
    return sample_centred(t - background, spacing, out_spacing, img_size) + background


def from_model_grid(x: np.ndarray, shape: Sequence[int], spacing: Sequence[float], data_cfg,
                    img_size: Sequence[int]) -> np.ndarray:
    """Step 2's geometry undone: a map on the model input grid back on the grid of a scan of
    ``shape`` and ``spacing`` (parts of the scan outside the model's field of view get 0)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    shape = [int(n) for n in shape]
    out_spacing = output_spacing(shape, spacing, data_cfg, img_size)
    if out_spacing is None:
        return center_fit(t, shape)[0, 0].numpy()
    return sample_centred(t, out_spacing, spacing, shape)[0, 0].numpy()


def unit_intensity(x, data_cfg):
    """Undo step 4: a model input (tensor or array) back on the [0, 1] scale of step 3.

    Analyses that read intensities (a CT value in HU is ``lo + unit * (hi - lo)`` of ``ct_window``)
    must go through this; the normalised values are centred near 0 and are not intensities.
    """
    return x * float(data_cfg.std) + float(data_cfg.mean)


def normalize(x, data_cfg):
    """Step 4: the [0, 1] intensity scale to the model's input scale; inverse of :func:`unit_intensity`."""
    return (x - float(data_cfg.mean)) / float(data_cfg.std)


def lr_axis(volume: Volume) -> int:
    """The array axis of ``volume`` (and of its model input) that runs left-right."""
    return nib.aff2axcodes(volume.affine).index("R")


def preprocess(volume: Volume, data_cfg, img_size: Sequence[int]) -> torch.Tensor:
    """The model input for one scan: float32 tensor [1, D, H, W] with ``(D, H, W) == img_size``."""
    a = correct_bias_field(suppress_bone(volume, data_cfg), volume, data_cfg)
    lo, hi = intensity_range(a, volume.modality, data_cfg)
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    t = to_model_grid(t, volume.spacing, data_cfg, img_size, background=lo)  # lo: what step 3 maps to 0
    return normalize(scale_intensity(t[0], lo, hi), data_cfg).contiguous().to(torch.float32)
