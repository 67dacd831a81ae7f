"""Readers on real third-party files: pydicom's and nibabel's test data, nilearn's MNI152 T1."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from hlip_fed.data import DataError
from hlip_fed.data.dicom_writer import write_dicom_series, write_enhanced_dicom
from hlip_fed.data.readers import read_scan

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
MNI_T1 = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
CT5N = Path(get_testdata_file("dicomdirtests/98892001/CT5N/2062")).parent


def test_dicom_series_sorted_by_position_not_file_name():
    files = sorted(CT5N.iterdir())  # 2062 ... 3353: file-name order runs from z=8.76 down to z=-1.24
    vol = read_scan(CT5N)
    assert vol.shape == (5, 16, 16) and vol.modality == "CT"
    assert vol.spacing == pytest.approx((2.5, 0.488281, 0.488281), abs=1e-6)
    assert vol.orientation == "SAR"
    # Depth runs inferior -> superior, so the last file by name is the first slice.
    for k, f in enumerate(reversed(files)):
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        # DICOM rows run posterior, columns left: canonical A and R axes are both reversed.
        np.testing.assert_array_equal(vol.array[k], hu[::-1, ::-1])
        world_z = (vol.affine @ [k, 0, 0, 1])[2]
        assert world_z == pytest.approx(float(ds.ImagePositionPatient[2]), abs=1e-4)


def test_instance_number_is_the_fallback_without_positions(tmp_path):
    for f in CT5N.iterdir():
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(tmp_path / f"{99 - int(ds.InstanceNumber)}.dcm")
    vol = read_scan(tmp_path)
    assert vol.shape[0] == 5 and any("InstanceNumber" in w for w in vol.warnings)
    ref = read_scan(CT5N)  # position order is the reverse of InstanceNumber order in this series
    np.testing.assert_array_equal(vol.array[::-1], ref.array)


def test_ct_small_rescaled_to_hounsfield_units():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    vol = read_scan(path, allow_2d=True)
    assert vol.shape == (1, 128, 128) and vol.modality == "CT"
    expected = ds.pixel_array.astype(np.float32) + np.float32(-1024.0)  # slope 1, intercept -1024
    np.testing.assert_array_equal(vol.array[0], expected[::-1, ::-1])
    assert vol.array.min() < -800  # air in HU, not the stored unsigned values


def _mr_series(out: Path, n: int = 4, step: float = 3.0) -> list[int]:
    """A real MR slice (pydicom's MR_small) stacked into a series with scrambled names/instances."""
    src = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    origin = np.array([float(v) for v in src.ImagePositionPatient])
    series_uid = generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    names = [3, 0, 2, 1][:n]
    for k in range(n):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = n - k  # deliberately wrong: positions decide
        ds.ImagePositionPatient = list(origin + [0, 0, k * step])
        ds.PixelData = (ds.pixel_array + np.int16(k * 1000)).astype(np.int16).tobytes()
        ds.save_as(out / f"slice{names[k]}.dcm")
    return names


def test_mr_series_from_real_slices(tmp_path):
    _mr_series(tmp_path / "mr")
    vol = read_scan(tmp_path / "mr")
    assert vol.modality == "MR" and vol.shape == (4, 64, 64)
    assert vol.spacing == pytest.approx((3.0, 0.3125, 0.3125))
    base = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)
    for k in range(4):
        np.testing.assert_array_equal(vol.array[k], (base + 1000 * k)[::-1, ::-1])


def test_real_mixed_and_projection_series_are_reported():
    mr2 = Path(get_testdata_file("dicomdirtests/98892003/MR2/4950")).parent
    with pytest.raises(DataError, match=r"mixes 3 series"):
        read_scan(mr2)
    with pytest.raises(DataError, match="different orientations"):  # a tri-planar localizer
        read_scan(mr2, series_uid="1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.136")
    mr700 = Path(get_testdata_file("dicomdirtests/98892003/MR700/4467")).parent
    with pytest.raises(DataError, match="different orientations"):
        read_scan(mr700)
    ct2 = Path(get_testdata_file("dicomdirtests/77654033/CT2/17106")).parent
    with pytest.raises(DataError, match=r"non-uniform slice spacing.*missing slices"):
        read_scan(ct2)
    with pytest.raises(DataError, match="mixes 2 patients"):
        read_scan(get_testdata_file("dicomdirtests/DICOMDIR"))


def test_small_spacing_irregularity_is_resampled(tmp_path):
    a = np.arange(6 * 4 * 4, dtype=np.float32).reshape(6, 4, 4)
    files = write_dicom_series(a, np.diag([2.0, 1.0, 1.0, 1.0]), tmp_path / "s", "CT")
    ds = pydicom.dcmread(files[3])  # nudge one slice by 0.3 mm
    ds.ImagePositionPatient[0] = float(ds.ImagePositionPatient[0]) - 0.3
    ds.save_as(files[3])
    vol = read_scan(tmp_path / "s")
    assert vol.shape == (6, 4, 4) and vol.spacing[0] == pytest.approx(2.0)
    assert any("non-uniform" in w for w in vol.warnings)


def test_dicomdir_and_enhanced_multiframe(tmp_path):
    from pydicom.fileset import FileSet

    rng = np.random.default_rng(0)
    a = rng.integers(-1000, 1000, (6, 10, 12)).astype(np.float32)
    aff = np.diag([2.5, 0.7, 0.8, 1.0])
    files = write_dicom_series(a, aff, tmp_path / "raw", "CT")
    fs = FileSet()
    for f in files:
        fs.add(pydicom.dcmread(f))
    fs.write(tmp_path / "media")
    via_dicomdir = read_scan(tmp_path / "media" / "DICOMDIR")
    via_folder = read_scan(tmp_path / "media")  # a folder holding a DICOMDIR
    direct = read_scan(tmp_path / "raw")
    np.testing.assert_array_equal(via_dicomdir.array, direct.array)
    np.testing.assert_array_equal(via_folder.array, direct.array)

    enhanced = read_scan(write_enhanced_dicom(a, aff, tmp_path / "enh.dcm", "CT"))
    np.testing.assert_array_equal(enhanced.array, direct.array)
    np.testing.assert_allclose(enhanced.affine, direct.affine, atol=1e-5)
    assert enhanced.meta["files"] == 1 and enhanced.meta["slices"] == 6


def test_compressed_transfer_syntaxes(tmp_path):
    from pydicom.pixels import get_decoder

    plain = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    rle = read_scan(get_testdata_file("MR_small_RLE.dcm"), allow_2d=True)  # pydicom decodes RLE natively
    np.testing.assert_array_equal(rle.array[0], plain[::-1, ::-1].astype(np.float32))
    jls = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    if get_decoder(pydicom.dcmread(jls).file_meta.TransferSyntaxUID).is_available:
        pytest.skip("a JPEG-LS decoder is installed")
    with pytest.raises(DataError) as err:
        read_scan(jls, allow_2d=True)
    assert "JPEG-LS" in str(err.value) and "decoder" in str(err.value) and "MR_small_jpeg_ls" in str(err.value)


def test_nibabel_test_files():
    anat = read_scan(NIBABEL_DATA / "anatomical.nii")  # stored LAS
    img = nib.load(NIBABEL_DATA / "anatomical.nii")
    assert anat.meta["source_orientation"] == "LAS" and anat.orientation == "SAR"
    assert sorted(anat.shape) == sorted(img.shape)
    assert anat.array.sum() == pytest.approx(float(np.asarray(img.dataobj, dtype=np.float64).sum()), rel=1e-6)
    std = read_scan(NIBABEL_DATA / "standard.nii.gz")
    assert std.spacing[0] == max(std.spacing)  # depth is the largest spacing
    with pytest.raises(DataError, match=r"4D volume \(128x96x24x2\)"):
        read_scan(NIBABEL_DATA / "example4d.nii.gz")
    with pytest.raises(DataError, match="4D volume"):
        read_scan(NIBABEL_DATA / "example_nifti2.nii.gz")  # NIfTI-2 header, read through


def test_mni152_t1():
    vol = read_scan(MNI_T1)
    assert vol.shape == (189, 233, 197) and vol.orientation == "SAR"
    assert vol.spacing == (1.0, 1.0, 1.0) and vol.modality == "MR"
    # World coordinates survive the reorientation: voxel (0,0,0) is the RAS corner of the template.
    src = nib.load(MNI_T1)
    corner = src.affine @ [0, 0, 0, 1]
    np.testing.assert_allclose(vol.affine @ [0, 0, 0, 1], corner)
    assert vol.array[0, 0, 0] == float(np.asarray(src.dataobj)[0, 0, 0])


def test_sidecar_sets_modality(tmp_path):
    shutil.copy(MNI_T1, tmp_path / "t1.nii.gz")
    (tmp_path / "t1.json").write_text('{"modality": "MR", "sequence": "T1"}')
    vol = read_scan(tmp_path / "t1.nii.gz")
    assert (vol.modality, vol.sequence) == ("MR", "T1")
    assert os.path.basename(vol.source) == "t1.nii.gz"
