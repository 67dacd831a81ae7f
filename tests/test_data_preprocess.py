"""Intensity scaling, geometry fitting and normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hlip_fed.config import DataConfig
from hlip_fed.data.preprocess import (center_fit, intensity_range, preprocess, resize, scale_intensity, to_model_grid,
                                      unit_intensity)
from hlip_fed.data.volume import make_volume


def _vol(array, modality="CT", spacing=(1.0, 1.0, 1.0)):
    """A volume whose canonical (S, A, R) array is ``array`` with ``spacing`` (D, H, W)."""
    ras = np.asarray(array, np.float32).transpose(2, 1, 0)
    vol = make_volume(ras, np.diag([*spacing[::-1], 1.0]), modality, "mem")
    assert vol.shape == np.shape(array)
    return vol


def test_ct_window_maps_hu_to_unit_range():
    vol = _vol(np.array([-2000, -1150, -400, 350, 3000], np.float32).reshape(5, 1, 1) * np.ones((1, 2, 2)))
    out = scale_intensity(vol.array, *intensity_range(vol.array, "CT", DataConfig(ct_window=[-1150.0, 350.0])))
    np.testing.assert_allclose(out[:, 0, 0], [0, 0, 0.5, 1, 1], atol=1e-6)


def test_mri_percentile_clip_then_min_max():
    rng = np.random.default_rng(0)
    a = rng.normal(100, 10, (20, 20, 20)).astype(np.float32)
    a[0, 0, 0] = 1e6  # a hot outlier must not squash the image
    out = scale_intensity(a, *intensity_range(a, "MR", DataConfig()))
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)
    assert 0.3 < np.median(out) < 0.7
    flat = np.full((4, 4, 4), 7.0)
    assert scale_intensity(flat, *intensity_range(flat, "MR", DataConfig())).max() == 0.0


def test_resize_and_crop_shapes_and_values():
    t = torch.ones(1, 1, 10, 40, 50)
    assert resize(t, (4, 16, 64)).shape == (1, 1, 4, 16, 64)
    torch.testing.assert_close(resize(t, (4, 16, 64)), torch.ones(1, 1, 4, 16, 64))
    c = center_fit(torch.arange(10.0).view(1, 1, 10, 1, 1), (4, 3, 1))
    assert c.shape == (1, 1, 4, 3, 1)
    assert c[0, 0, :, 1, 0].tolist() == [3, 4, 5, 6] and c[0, 0, :, 0, 0].tolist() == [0, 0, 0, 0]


def test_target_spacing_then_crop_keeps_physical_size():
    a = np.zeros((10, 40, 40), np.float32) - 1000
    a[:, 10:30, 10:30] = 350  # a 20 mm square at 1 mm spacing
    cfg = DataConfig(fit="crop", target_spacing=[2.0, 2.0, 2.0], ct_bone_hu=None)
    t = preprocess(_vol(a, spacing=(2.0, 1.0, 1.0)), cfg, (8, 32, 32))
    assert t.shape == (1, 8, 32, 32)
    assert int((t[0, 4] > 0.5).sum()) == pytest.approx(100, abs=12)  # 10x10 pixels of 2 mm


def test_mean_std_normalisation_and_dtype():
    cfg = DataConfig(mean=0.5, std=0.25, ct_bone_hu=None)
    t = preprocess(_vol(np.full((4, 8, 8), 350.0)), cfg, (4, 8, 8))
    assert t.dtype == torch.float32 and t.shape == (1, 4, 8, 8)
    torch.testing.assert_close(t, torch.full_like(t, 2.0))


def _skull_and_bleed(spacing_mm=1.0, n=60):
    """A noise-free axial CT: air, a 2 mm skull ring, brain at 35 HU and a 65 HU bleed away from it."""
    yy, xx = np.mgrid[:n, :n] * spacing_mm
    r = np.hypot(yy - n * spacing_mm / 2, xx - n * spacing_mm / 2)
    sl = np.full((n, n), -1000.0, np.float32)
    sl[r < 26] = 1100.0
    sl[r < 24] = 35.0
    bleed = np.hypot(yy - 30, xx - 20) < 5  # 10 mm from the skull's inner surface
    sl[bleed] = 65.0
    return np.repeat(sl[None], 8, axis=0), r, bleed


def test_no_blood_valued_halo_between_skull_and_brain():
    """Windowing before resampling turned the skull's edge into a band at fresh blood's value."""
    a, r, bleed = _skull_and_bleed()
    cfg = DataConfig()  # brain window 0..80 HU: blood 65 HU -> 0.81, brain 35 HU -> 0.44
    x = unit_intensity(preprocess(_vol(a, spacing=(5.0, 1.0, 1.0)), cfg, (8, 48, 48))[0, 4].numpy(), cfg)
    small = lambda m: torch.nn.functional.interpolate(torch.from_numpy(m.astype(np.float32))[None, None], (48, 48),
                                                      mode="area")[0, 0].numpy()
    rim = (small(r < 26.5) > 0.99) & (small(r < 21) < 0.01)  # between the skull's outside and the brain
    blood = 65.0 / 80.0
    assert rim.sum() > 100
    assert not (np.abs(x[rim] - blood) < 0.1).any(), np.sort(x[rim])[-5:]
    assert x[rim].max() <= 35.0 / 80.0 + 0.02  # nothing in the rim brighter than brain: bone is background
    assert (np.abs(x[small(bleed) > 0.99] - blood) < 0.02).all()  # the bleed itself keeps its value


def _study_on(scanner: dict):
    """One phantom CT study (a bleed) rendered on ``scanner``'s grid, without noise or HU offset."""
    from hlip_fed.synth.render import StudyPlan, render_study

    plan = StudyPlan(cohort="x", study_id="X1", split="train", seed=(7, 1, 1),
                     labels={"mass": 0, "haemorrhage": 1, "infarct": 0, "atrophy": 0}, modality="CT",
                     fmt="nifti", scanner={**scanner, "noise": 0.0, "offset": 0.0}, protocol={"CT": 1.0})
    scan = render_study(plan).scans[0]
    return make_volume(scan.array, scan.affine, "CT", "mem")


def test_one_study_on_two_site_grids_gives_the_same_model_input():
    """A study written on northgate-stroke's grid (2.3 mm, 5 mm slices: already the model's size)
    and on harbour-trauma's (2.0 mm, 4 mm) should not be told apart by its model input. With one
    target spacing both are sampled on one physical grid at one resolution: mean absolute difference
    over the head 0.025 and 99th percentile inside the brain 0.046 of the intensity range (measured;
    windowing before an area resize of each field of view gave 0.117 and 0.079)."""
    from scipy import ndimage

    from hlip_fed.synth.sites import _ARCHETYPES

    scanners = {s["name"]: s["scanner"] for s in _ARCHETYPES}
    a, b = _study_on(scanners["northgate-stroke"]), _study_on(scanners["harbour-trauma"])
    cfg = DataConfig(fit="crop", target_spacing=[5.0, 2.4, 2.4])
    xa, xb = (unit_intensity(preprocess(v, cfg, (32, 96, 96))[0].numpy(), cfg) for v in (a, b))
    diff = np.abs(xa - xb)
    head = (xa > 0.05) | (xb > 0.05)
    brain = ndimage.binary_erosion((xa > 0.2) & (xb > 0.2), iterations=2)
    assert head.sum() > 50_000 and brain.sum() > 20_000
    assert diff[head].mean() < 0.035 and np.percentile(diff[brain], 99) < 0.06, (
        diff[head].mean(), np.percentile(diff[brain], 99))


def _biased_mr(bias: float, lesion: float = 1.0, radius_mm: float = 13.0):
    """An MR head on a typical site grid (36 x 104 x 104 of 4.5 x 2.2 x 2.2 mm): uniform tissue at
    0.8 with a ball of ``radius_mm`` at ``lesion`` (by default 2.6 cm at 1.0: a bleed on T1, 25 %
    brighter) inside a scalp of fat at 1.3 (the brightest tissue, as on T1, so the percentile clip
    lands there), times a smooth multiplicative field that spans exp(+-bias) across the head, as a
    receive coil's sensitivity does. Returns the scan and the masks of the tissue around the lesion
    and of the lesion, on the model's grid."""
    d, h, w = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in (36, 104, 104)), indexing="ij")
    z, y, x = (d - 17.5) * 4.5, (h - 51.5) * 2.2, (w - 51.5) * 2.2
    r_head = np.sqrt((z / 70) ** 2 + (y / 95) ** 2 + (x / 75) ** 2)
    r_lesion = np.sqrt((z - 10) ** 2 + (y - 20) ** 2 + (x + 30) ** 2)
    tissue = np.where(r_head < 0.9, np.where(r_lesion < radius_mm, lesion, 0.8), np.where(r_head < 1, 1.3, 0.0))
    field = np.exp(bias * (x / 75 + 0.5 * y / 95))
    value = 1000 * tissue * field + np.random.default_rng(0).normal(0, 10, tissue.shape)
    vol = _vol(np.abs(value), "MR", (4.5, 2.2, 2.2))
    cfg = DataConfig(fit="crop", target_spacing=[5.0, 2.4, 2.4])
    on_grid = [to_model_grid(torch.from_numpy(m.astype(np.float32))[None, None], vol.spacing, cfg, (32, 96, 96))[0, 0]
               .numpy() > 0.99 for m in ((r_head < 0.8) & (r_lesion > radius_mm + 7), r_lesion < radius_mm - 3)]
    return vol, *on_grid


def test_mri_bias_correction_flattens_a_smooth_field_and_keeps_the_lesion():
    """N4 removes most of a coil's smooth field from the model input (tissue of one value varies far
    less across the head) and leaves the lesion as much brighter than its surroundings as it is."""
    size = (32, 96, 96)
    off = DataConfig(fit="crop", target_spacing=[5.0, 2.4, 2.4])
    on = DataConfig(fit="crop", target_spacing=[5.0, 2.4, 2.4], mri_bias_correction=True)
    vol, tissue, lesion = _biased_mr(0.35)
    assert tissue.sum() > 30_000 and lesion.sum() > 50
    source = vol.array.copy()
    x_off, x_on = (unit_intensity(preprocess(vol, cfg, size)[0].numpy(), cfg) for cfg in (off, on))
    np.testing.assert_array_equal(vol.array, source)  # the scan itself is not touched
    cv_off, cv_on = (x[tissue].std() / x[tissue].mean() for x in (x_off, x_on))
    assert cv_on < 0.5 * cv_off, (cv_off, cv_on)
    assert 1.15 < x_on[lesion].mean() / x_on[tissue].mean() < 1.35, x_on[lesion].mean() / x_on[tissue].mean()


def test_mri_foreground_scale_keeps_normal_tissue_where_it_is_whatever_the_lesion():
    """Scaled to its percentiles, a scan whose large bright lesion (FLAIR oedema, say) outgrows the
    top 0.5 % of voxels takes the lesion as its 1, so the same normal tissue reads darker than in a
    scan without it; scaled to the median of the head, normal tissue reads the same in both and the
    lesion keeps its contrast."""
    size = (32, 96, 96)
    common = {"fit": "crop", "target_spacing": [5.0, 2.4, 2.4]}
    percentiles, foreground = DataConfig(**common), DataConfig(**common, mri_scale="foreground")
    normal, tissue, _ = _biased_mr(0.0, lesion=0.8, radius_mm=28.0)
    sick, _, lesion = _biased_mr(0.0, lesion=2.0, radius_mm=28.0)
    source = sick.array.copy()

    def read(vol, cfg):
        return unit_intensity(preprocess(vol, cfg, size)[0].numpy(), cfg)

    p_normal, p_sick = read(normal, percentiles)[tissue].mean(), read(sick, percentiles)[tissue].mean()
    f_normal, f_sick = read(normal, foreground)[tissue].mean(), read(sick, foreground)[tissue].mean()
    assert p_sick < 0.8 * p_normal, (p_normal, p_sick)
    assert abs(f_sick - f_normal) < 0.03 * f_normal, (f_normal, f_sick)
    assert read(sick, foreground)[lesion].mean() > 2.0 * f_sick
    np.testing.assert_array_equal(sick.array, source)
    ct = _vol(np.random.default_rng(1).normal(30, 5, (20, 40, 40)), "CT", (5.0, 2.4, 2.4))
    torch.testing.assert_close(preprocess(ct, foreground, (16, 32, 32)), preprocess(ct, percentiles, (16, 32, 32)))
    blank = _vol(np.zeros((20, 40, 40)), "MR", (5.0, 2.4, 2.4))
    assert unit_intensity(preprocess(blank, foreground, (16, 32, 32)), foreground).abs().max() < 1e-6


def test_mri_bias_correction_leaves_ct_and_unbiased_mr_alone():
    cfg = DataConfig(fit="crop", target_spacing=[5.0, 2.4, 2.4])
    on = DataConfig(fit="crop", target_spacing=[5.0, 2.4, 2.4], mri_bias_correction=True)
    ct = _vol(np.random.default_rng(1).normal(30, 5, (20, 40, 40)), "CT", (5.0, 2.4, 2.4))
    torch.testing.assert_close(preprocess(ct, on, (16, 32, 32)), preprocess(ct, cfg, (16, 32, 32)))
    flat = _biased_mr(0.0)[0]
    x_off, x_on = (unit_intensity(preprocess(flat, c, (32, 96, 96))[0].numpy(), c) for c in (cfg, on))
    head = x_off > 0.2
    assert np.abs(x_on[head] - x_off[head]).mean() < 0.02
    blank = _vol(np.zeros((20, 40, 40)), "MR", (5.0, 2.4, 2.4))  # nothing to estimate a field from
    assert preprocess(blank, on, (16, 32, 32)).shape == (1, 16, 32, 32)


def test_cache_key_of_settings_without_bias_correction_is_unchanged():
    """Caches written before the option existed stay valid; turning it on makes new entries."""
    from hlip_fed.data.cache import preprocess_key

    assert preprocess_key(DataConfig(), (32, 96, 96)) == "f79b1e9f0de646b0"
    crop = DataConfig(fit="crop", target_spacing=[5.0, 2.4, 2.4])
    assert preprocess_key(crop, (32, 96, 96)) == "d542dfbae4d42652"
    crop.mri_bias_correction = True
    assert preprocess_key(crop, (32, 96, 96)) != "d542dfbae4d42652"
    scaled = DataConfig(fit="crop", target_spacing=[5.0, 2.4, 2.4], mri_scale="foreground")
    assert preprocess_key(scaled, (32, 96, 96)) not in ("d542dfbae4d42652", preprocess_key(crop, (32, 96, 96)))
