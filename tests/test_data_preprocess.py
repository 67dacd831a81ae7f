"""Intensity scaling, geometry fitting and normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hlip_fed.config import DataConfig
from hlip_fed.data.preprocess import center_fit, preprocess, resize, scale_intensity
from hlip_fed.data.volume import make_volume


def _vol(array, modality="CT", spacing=(1.0, 1.0, 1.0)):
    """A volume whose canonical (S, A, R) array is ``array`` with ``spacing`` (D, H, W)."""
    ras = np.asarray(array, np.float32).transpose(2, 1, 0)
    vol = make_volume(ras, np.diag([*spacing[::-1], 1.0]), modality, "mem")
    assert vol.shape == np.shape(array)
    return vol


def test_ct_window_maps_hu_to_unit_range():
    vol = _vol(np.array([-2000, -1150, -400, 350, 3000], np.float32).reshape(5, 1, 1) * np.ones((1, 2, 2)))
    out = scale_intensity(vol, DataConfig(ct_window=[-1150.0, 350.0]))
    np.testing.assert_allclose(out[:, 0, 0], [0, 0, 0.5, 1, 1], atol=1e-6)


def test_mri_percentile_clip_then_min_max():
    rng = np.random.default_rng(0)
    a = rng.normal(100, 10, (20, 20, 20)).astype(np.float32)
    a[0, 0, 0] = 1e6  # a hot outlier must not squash the image
    out = scale_intensity(_vol(a, "MR"), DataConfig())
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)
    assert 0.3 < np.median(out) < 0.7
    assert scale_intensity(_vol(np.full((4, 4, 4), 7.0), "MR"), DataConfig()).max() == 0.0


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
    cfg = DataConfig(fit="crop", target_spacing=[2.0, 2.0, 2.0])
    t = preprocess(_vol(a, spacing=(2.0, 1.0, 1.0)), cfg, (8, 32, 32))
    assert t.shape == (1, 8, 32, 32)
    assert int((t[0, 4] > 0.5).sum()) == pytest.approx(100, abs=12)  # 10x10 pixels of 2 mm


def test_mean_std_normalisation_and_dtype():
    cfg = DataConfig(mean=0.5, std=0.25)
    t = preprocess(_vol(np.full((4, 8, 8), 350.0)), cfg, (4, 8, 8))
    assert t.dtype == torch.float32 and t.shape == (1, 4, 8, 8)
    torch.testing.assert_close(t, torch.full_like(t, 2.0))
