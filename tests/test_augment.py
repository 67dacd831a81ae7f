"""Training-time image augmentation: masks move with their images, mirrors swap the report's sides."""

import numpy as np
import pytest
import torch

from hlip_fed.config import DataConfig
from hlip_fed.data.augment import RandLateralFlipd, StudyAugmentation, swap_sides
from hlip_fed.data.preprocess import normalize, unit_intensity

IMG = (16, 32, 32)


def _study(side: str):
    """Two scans of a dim head with a bright block on the patient's ``side`` (axis W runs to the
    right), its truth mask, and a report that names the side."""
    cfg = DataConfig()
    x = torch.zeros(2, 1, *IMG)
    x[:, :, 3:13, 6:26, 4:28] = 0.3
    mask = torch.zeros(1, *IMG)
    w = slice(19, 25) if side == "right" else slice(7, 13)
    mask[0, 6:11, 12:20, w] = 1
    x[:, 0][mask.expand(2, *IMG) > 0] = 0.9
    return normalize(x, cfg), mask, f"Hyperdense focus in the {side} frontal lobe. Left ventricle normal."


def _named_side(report: str) -> str:
    return "right" if "right frontal" in report else "left" if "left frontal" in report else "?"


@pytest.mark.parametrize("preset", ["light", "rigid", "scanner", "intensity"])
def test_truth_mask_moves_with_its_image_and_the_report_with_its_mirror(preset):
    cfg = DataConfig()
    aug = StudyAugmentation(preset, cfg, IMG)
    x, mask, report = _study("right")
    flipped = 0
    for seed in range(24):
        y, text, m = aug(x, report, [2, 2], mask=mask, seed=seed)
        assert y.shape == x.shape and m.shape == mask.shape and set(m.unique().tolist()) <= {0.0, 1.0}
        u = unit_intensity(y, cfg)[0, 0]
        inside, outside = m[0] > 0, (m[0] == 0) & (u > 0.05)
        assert inside.sum() > 30
        assert u[inside].mean() > u[outside].mean() + 0.2, seed  # the block is where its mask went
        centroid = torch.nonzero(m[0]).float().mean(0)[2].item()
        side = "right" if centroid > (IMG[2] - 1) / 2 else "left"
        assert _named_side(text) == side, (seed, text, centroid)  # image and report agree
        flipped += side == "left"
        if side == "left":
            assert "Right ventricle normal." in text  # every side word swaps, with its case
    assert 4 <= flipped <= 20  # mirrored about half the time


def test_light_preset_keeps_the_block_sharp_enough_to_segment():
    cfg = DataConfig()
    aug = StudyAugmentation("light", cfg, IMG)
    x, mask, report = _study("left")
    for seed in range(8):
        y, _, m = aug(x, report, [2, 2], mask=mask, seed=seed)
        u = unit_intensity(y, cfg)[0, 0]
        seg, truth = u > 0.6 * u.max(), m[0] > 0
        dice = 2 * (seg & truth).sum() / (seg.sum() + truth.sum())
        assert dice > 0.7, (seed, float(dice))


def test_rigid_preset_moves_a_structure_and_keeps_its_size_where_light_scales_it():
    """``rigid`` is ``light`` without its scaling: a lesion's volume (and a head's) stays the
    patient's, up to the resampling of its edge."""
    cfg = DataConfig()
    x, mask, report = _study("right")
    change = {}
    for preset in ("rigid", "light"):
        aug = StudyAugmentation(preset, cfg, IMG)
        outs = [aug(x, report, [2, 2], mask=mask, seed=seed)[2] for seed in range(24)]
        change[preset] = [abs(m.sum().item() / mask.sum().item() - 1) for m in outs]
        assert sum(not torch.equal(m, mask) and not torch.equal(m, mask.flip(-1)) for m in outs) >= 12  # moved
    assert max(change["rigid"]) < 0.05 < 0.1 < max(change["light"]), change


def test_intensity_preset_changes_intensities_and_moves_no_voxel_but_by_the_mirror():
    """``intensity`` is ``scanner`` without its warp: each study's mask stays or is exactly
    mirrored, while its voxel values change."""
    cfg = DataConfig()
    aug = StudyAugmentation("intensity", cfg, IMG)
    x, mask, report = _study("right")
    changed = 0
    for seed in range(24):
        y, text, m = aug(x, report, [2, 2], mask=mask, seed=seed)
        mirrored = _named_side(text) == "left"
        assert torch.equal(m, mask.flip(-1) if mirrored else mask), seed
        back = y.flip(-1) if mirrored else y
        changed += not torch.allclose(back, x, atol=1e-4)
    assert changed >= 12  # most draws alter some intensity (each transform has p 0.15-0.3)


def test_augmentation_is_reproducible_for_a_seed_and_none_is_identity():
    cfg = DataConfig()
    x, _, report = _study("left")
    aug = StudyAugmentation("scanner", cfg, IMG)
    a, b = aug(x, report, [2, 2], seed=5), aug(x, report, [2, 2], seed=5)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], aug(x, report, [2, 2], seed=6)[0])
    none = StudyAugmentation("none", cfg, IMG)
    assert not none and none(x, report, [2, 2])[0] is x
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        StudyAugmentation("heavy", cfg, IMG)


def test_each_scan_mirrors_along_its_own_left_right_axis():
    """An axial scan runs left-right along W, a sagittal thick-slice one along D (canonical order)."""
    flip = RandLateralFlipd(prob=1.0)
    img = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(2, 4, 4, 4)
    out = flip({"image": img, "report": "left", "lr_axes": [2, 0]})
    assert torch.equal(out["image"][0], img[0].flip(2)) and torch.equal(out["image"][1], img[1].flip(0))
    assert out["report"] == "right"


def test_a_mirrored_generated_report_is_the_report_of_the_mirrored_study():
    """Every side word the generator writes is swapped: the mirrored report is exactly what the
    generator writes for the same findings on the other side."""
    import copy

    from hlip_fed.synth.anatomy import head_atlas
    from hlip_fed.synth.findings import FINDINGS, draw_findings
    from hlip_fed.synth.reports import STYLES, write_report

    atlas = head_atlas()
    rng = np.random.default_rng(11)
    seen = 0
    for i in range(40):
        findings = draw_findings(atlas, {f: int(rng.random() < 0.6) for f in FINDINGS}, rng)
        mirrored = copy.deepcopy(findings)
        for f in mirrored:
            f.laterality = {"left": "right", "right": "left"}.get(f.laterality, f.laterality)
        style, modality = sorted(STYLES)[i % len(STYLES)], "CT" if i % 2 else "MR"
        seqs = [] if modality == "CT" else ["T1", "T2", "FLAIR", "T1C"]
        state = rng.bit_generator.state
        text = write_report(findings, modality, seqs, style, rng, 5.0)
        rng.bit_generator.state = state
        assert swap_sides(text) == write_report(mirrored, modality, seqs, style, rng, 5.0)
        seen += any(f.laterality in ("left", "right") for f in findings)
    assert seen > 10
