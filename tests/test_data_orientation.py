"""One anatomy, many storage orders: NIfTI RAS, NIfTI LPS and a DICOM series read and preprocess
identically, and DICOM -> NIfTI conversion keeps world coordinates."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from hlip_fed.cli import main
from hlip_fed.config import DataConfig
from hlip_fed.data.dicom_writer import write_dicom_series
from hlip_fed.data.preprocess import preprocess
from hlip_fed.data.readers import read_scan
from hlip_fed.data.volume import canonical_order


def _phantom(shape=(24, 28, 10)) -> np.ndarray:
    """An asymmetric HU phantom (RAS array: x=R, y=A, z=S) so that any flip would show."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = np.where(x**2 + y**2 < 0.8, 40.0, -1000.0)
    bone = np.where((x - 0.3) ** 2 + (y + 0.2) ** 2 < 0.05, 900.0, 0.0)
    ramp = np.round(100 * z + 30 * x)
    return (body + bone + ramp).astype(np.float32)


RAS_AFFINE = np.array([[0.9, 0, 0, -12.0], [0, 0.8, 0, 7.5], [0, 0, 3.0, -40.0], [0, 0, 0, 1]])


def _save(array, affine, path: Path, axcodes: str) -> Path:
    img = nib.Nifti1Image(array, affine)
    target = nib.orientations.axcodes2ornt(axcodes)
    img = img.as_reoriented(nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), target))
    nib.save(img, path)
    return path


@pytest.fixture
def three_copies(tmp_path):
    a = _phantom()
    ras = _save(a, RAS_AFFINE, tmp_path / "ras.nii.gz", "RAS")
    lps = _save(a, RAS_AFFINE, tmp_path / "lps.nii.gz", "LPS")
    write_dicom_series(a, RAS_AFFINE, tmp_path / "dicom", "CT", slice_axis=2)
    return ras, lps, tmp_path / "dicom"


def test_ras_and_lps_read_to_the_same_canonical_array(three_copies):
    ras, lps, _ = three_copies
    assert "".join(nib.aff2axcodes(nib.load(lps).affine)) == "LPS"
    a, b = read_scan(ras), read_scan(lps)
    assert a.meta["source_orientation"] == "RAS" and b.meta["source_orientation"] == "LPS"
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)
    assert a.orientation == "SAR" and a.spacing == pytest.approx((3.0, 0.8, 0.9))


def test_nifti_ras_lps_and_dicom_give_the_same_tensor(three_copies):
    cfg = DataConfig(fit="crop", target_spacing=[4.0, 1.5, 1.5])
    tensors = [preprocess(read_scan(p), cfg, (8, 16, 16)) for p in three_copies]
    assert tensors[0].shape == (1, 8, 16, 16)
    # NIfTI stores spacings in float32 (0.800000012 mm), DICOM as decimal text (0.8 mm): the
    # resolution filter and the sampling grid differ by that much, about 1e-5 at the input
    for t in tensors[1:]:
        torch.testing.assert_close(t, tensors[0], rtol=0, atol=1e-4)
    cfg = DataConfig(fit="resize")
    tensors = [preprocess(read_scan(p), cfg, (8, 16, 16)) for p in three_copies]
    for t in tensors[1:]:
        torch.testing.assert_close(t, tensors[0], rtol=0, atol=1e-4)


def test_dicom_converted_keeps_world_coordinates(three_copies, tmp_path):
    _, _, dicom = three_copies
    out = tmp_path / "converted.nii.gz"
    assert main(["volume", "convert", str(dicom), str(out)]) == 0
    src, back = read_scan(dicom), read_scan(out)
    np.testing.assert_array_equal(back.array, src.array)  # raw HU, int16 on disk
    assert nib.load(out).get_data_dtype() == np.int16
    rng = np.random.default_rng(1)
    for ijk in rng.integers(0, src.shape, size=(5, 3)):
        np.testing.assert_allclose(back.affine @ [*ijk, 1], src.affine @ [*ijk, 1], atol=1e-4)
    # and the same voxel sits at the same world point in the original RAS phantom
    ijk_ras = np.linalg.solve(RAS_AFFINE, back.affine @ [2, 3, 4, 1])
    np.testing.assert_allclose(ijk_ras, np.round(ijk_ras), atol=1e-4)
    assert back.array[2, 3, 4] == _phantom()[tuple(np.round(ijk_ras[:3]).astype(int))]


def test_depth_axis_rule():
    # (R, A, S) spacings: the largest spacing becomes depth; ties go to S, then A.
    assert canonical_order(np.array([0.7, 0.7, 5.0])) == (2, 1, 0)  # axial: S, A, R
    assert canonical_order(np.array([5.0, 0.7, 0.7])) == (0, 2, 1)  # sagittal: R, S, A
    assert canonical_order(np.array([0.7, 5.0, 0.7])) == (1, 2, 0)  # coronal: A, S, R
    assert canonical_order(np.array([1.0, 1.0, 1.0])) == (2, 1, 0)
    assert canonical_order(np.array([3.0, 3.0, 1.0])) == (1, 2, 0)  # A-S tie without S: A wins


def test_sagittal_acquisition_keeps_the_slice_axis_as_depth(tmp_path):
    a = _phantom((6, 30, 32))  # thick sagittal slices along R
    aff = np.diag([4.0, 0.9, 0.9, 1.0])
    vol = read_scan(_save(a, aff, tmp_path / "sag.nii.gz", "PIL"))
    assert vol.orientation == "RSA" and vol.shape == (6, 32, 30)
    assert vol.spacing == pytest.approx((4.0, 0.9, 0.9))
