"""The phantom consortium: determinism, visible findings, faithful reports, distinct sites, formats.

One mini consortium (3 sites x ~4 studies + 4 held-out) is generated once through the CLI; the
finding-visibility checks render dedicated studies with every contrast so that each finding is
measured on each contrast, at the model's input resolution after the project's preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from hlip_fed.synth.findings import FINDINGS

SITES = 3


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    from hlip_fed.cli import main

    root = tmp_path_factory.mktemp("phantom") / "c"
    rc = main(["synth", "--out", str(root), "--sites", str(SITES), "--studies", "4", "--heldout", "4",
               "--seed", "7", "--workers", "1"])
    assert rc == 0
    return root


def _tree_digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(skip):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_layout_and_description(consortium):
    from hlip_fed.synth.truth import cohorts, load_consortium, load_prompts, load_truth

    desc = load_consortium(consortium)
    assert desc["findings"] == list(FINDINGS)
    assert [s["modality"] for s in desc["sites"]].count("CT") >= 1
    assert {"dicom", "nifti"} <= {s["format"] for s in desc["sites"]}
    assert (consortium / "overview.png").stat().st_size > 10_000
    for name in cohorts(consortium) + ["heldout"]:
        truth = load_truth(consortium, name)
        base = consortium / ("heldout" if name == "heldout" else f"sites/{name}")
        on_disk = {p.name for split in ("train", "test") for p in (base / split).glob("*") if p.is_dir()}
        assert set(truth) == on_disk
        assert all(set(labels) == set(FINDINGS) for labels in truth.values())
    for s in desc["sites"]:
        assert s["train"] >= 1 and s["test"] >= 1
    prompts = load_prompts(consortium)
    assert set(prompts) == set(FINDINGS)
    assert all(p["positive"] and p["negative"] for p in prompts.values())


def test_truth_never_inside_site_folders(consortium):
    for path in (consortium / "sites").rglob("*"):
        assert path.name not in ("labels.json", "truth.json") and not path.name.endswith(".jsonl")
    for sidecar in (consortium / "sites").rglob("*.json"):
        text = sidecar.read_text()
        assert not any(f'"{name}"' in text for name in FINDINGS), sidecar


def test_every_site_passes_site_check(consortium):
    from hlip_fed.data.check import check_site

    for site in sorted((consortium / "sites").iterdir()) + [consortium / "heldout"]:
        report = check_site(site)
        assert report.usable and report.studies_bad == 0 and report.scans_bad == 0, report.lines()
        assert not report.problems


def test_deterministic_for_a_seed(consortium, tmp_path):
    from hlip_fed.synth.consortium import build_consortium

    again = tmp_path / "again"
    build_consortium(again, "demo", sites=SITES, studies=4, heldout=0, seed=7)
    a = _tree_digest(consortium / "sites")
    b = _tree_digest(again / "sites")
    assert a == b  # byte-identical images (NIfTI and DICOM), sidecars and reports
    for site in (consortium / "sites").iterdir():
        assert (consortium / "truth" / f"{site.name}.jsonl").read_bytes() == (again / "truth" / f"{site.name}.jsonl").read_bytes()


def test_another_seed_gives_other_studies():
    from hlip_fed.synth.consortium import plan_consortium
    from hlip_fed.synth.render import render_study
    from hlip_fed.synth.sites import preset

    _, c0 = plan_consortium(preset("demo", 2, 3, 0), 0)
    _, c1 = plan_consortium(preset("demo", 2, 3, 0), 1)
    s0 = render_study(next(iter(c0.values()))[0])
    s1 = render_study(next(iter(c1.values()))[0])
    assert not np.array_equal(s0.scans[0].array, s1.scans[0].array)


# --- findings are visible where the truth says, in the direction radiology describes -------------

# +1: brighter than the contralateral (mirror) region, -1: darker. Atrophy compares the tissue that
# became CSF with the rest of the brain parenchyma.
EXPECTED = {
    "mass": {"T1": -1, "T2": +1, "FLAIR": +1, "T1C": +1, "CT": -1},
    "haemorrhage": {"T1": +1, "T2": -1, "FLAIR": -1, "T1C": +1, "CT": +1},
    "infarct": {"T1": -1, "T2": +1, "FLAIR": +1, "T1C": -1, "CT": -1},
    "atrophy": {"T1": -1, "T2": +1, "FLAIR": -1, "T1C": -1, "CT": -1},
}
# The region measured: the lesion (and its oedema) for most, the enhancing part for T1C masses,
# the haematoma itself for haemorrhage.
REGION = {("mass", "T1C"): "mass_enhancing", ("haemorrhage", None): "blood"}


def _plans():
    from hlip_fed.synth.render import StudyPlan
    from hlip_fed.synth.sites import HELDOUT_SCANNERS

    plans = []
    full = {"T1": 1.0, "T2": 1.0, "FLAIR": 1.0, "T1C": 1.0}
    for i in range(3):
        for modality in ("MR", "CT"):
            for labels in ({"mass": 1, "haemorrhage": 1, "infarct": 1, "atrophy": 0},
                           {"mass": 0, "haemorrhage": 0, "infarct": 0, "atrophy": 1}):
                plans.append(StudyPlan(
                    cohort="visibility", study_id=f"V{len(plans):03d}", split="test", seed=(99, i, len(plans)),
                    labels=labels, modality=modality, fmt="nifti", scanner=HELDOUT_SCANNERS[modality],
                    protocol=full, naming="series", style="terse"))
    return plans


def _model_res(array: np.ndarray, affine: np.ndarray, size) -> np.ndarray:
    import torch

    from hlip_fed.data.preprocess import resize
    from hlip_fed.data.volume import make_volume

    vol = make_volume(array.astype(np.float32), affine, "MR", "mask")
    return resize(torch.from_numpy(vol.array)[None, None], size)[0, 0].numpy()


def _weighted_mean(x: np.ndarray, w: np.ndarray) -> float:
    w = np.where(w > 0.5, w, 0.0)
    assert w.sum() > 0, "region vanished at model resolution"
    return float((x * w).sum() / w.sum())


def test_every_finding_is_visible_at_model_resolution(tmp_path):
    from hlip_fed.config import DataConfig, load_config
    from hlip_fed.data.preprocess import preprocess, unit_intensity
    from hlip_fed.data.readers import read_scan
    from hlip_fed.synth.lesions import CLASSES
    from hlip_fed.synth.render import render_study
    from hlip_fed.synth.writer import write_study

    size = list(load_config("tiny").model.vision.img_size)
    cfg = DataConfig()
    checked = set()
    for plan in _plans():
        study = render_study(plan)
        folder = tmp_path / plan.study_id
        scans = write_study(study, folder, 0)
        for scan, meta in zip(study.scans, scans):
            if scan.array.shape != study.grid_shape:
                continue  # a thin CT reconstruction: other grid, same anatomy
            x = unit_intensity(preprocess(read_scan(folder / meta["name"]), cfg, size)[0].numpy(), cfg)
            for f in study.findings:
                expected = EXPECTED[f.name][scan.sequence]
                if f.name == "atrophy":
                    region = _model_res(study.mask("atrophy"), study.grid_affine, size)
                    par = study.composition.fraction("gm") + study.composition.fraction("wm")
                    ref = _model_res(par.reshape(study.grid_shape), study.grid_affine, size)
                    ref = np.where(region > 0.3, 0.0, ref)
                else:
                    part = REGION.get((f.name, scan.sequence)) or REGION.get((f.name, None))
                    region = _model_res(study.part(part) if part else study.mask(f.name), study.grid_affine, size)
                    mpart = f"{part}_mirror" if part else None
                    ref = _model_res(study.part(mpart) if mpart else study.mask(f.name, mirror=True),
                                     study.grid_affine, size)
                inside, outside = _weighted_mean(x, region), _weighted_mean(x, ref)
                assert np.sign(inside - outside) == expected, (
                    f"{plan.study_id} {f.name} ({f.region}, {f.size_cm}) on {scan.sequence}: "
                    f"{inside:.3f} vs {outside:.3f}, expected {'brighter' if expected > 0 else 'darker'}")
                # At least 3 % of the input range for every contrast: a CT window so wide that a
                # bleed is a few hundredths of it hides the finding from the model.
                assert abs(inside - outside) > 0.03, (
                    f"{plan.study_id} {f.name} on {scan.sequence}: {inside:.3f} vs {outside:.3f} is too faint")
                checked.add((f.name, scan.sequence))
    assert checked == {(f, s) for f in FINDINGS for s in ("T1", "T2", "FLAIR", "T1C", "CT")}
    assert "blood" in CLASSES


# --- reports ------------------------------------------------------------------------------------

def _many_reports(n: int = 150):
    """Reports for random finding sets in every style and modality (no images needed)."""
    from hlip_fed.synth.anatomy import head_atlas
    from hlip_fed.synth.findings import draw_findings
    from hlip_fed.synth.reports import STYLES, write_report

    atlas = head_atlas()
    rng = np.random.default_rng(5)
    out = []
    styles = sorted(STYLES)
    for i in range(n):
        labels = {f: int(rng.random() < 0.35) for f in FINDINGS}
        findings = draw_findings(atlas, labels, rng)
        modality = "CT" if i % 3 == 0 else "MR"
        seqs = [] if modality == "CT" else [s for s in ("T1", "T2", "FLAIR", "T1C") if rng.random() < 0.6] or ["T2"]
        text = write_report(findings, modality, seqs, styles[i % len(styles)], rng, 5.0)
        out.append((text, findings))
    return out


def _check_report(text: str, findings) -> None:
    from hlip_fed.synth.reports import TEMPLATE_TERMS, _NEG_CUES, read_mentions, sentences

    present = {f.name for f in findings}
    mentions = read_mentions(text)
    for name in FINDINGS:
        if name in present:
            assert mentions[name] == "pos", (name, text)
        else:
            assert mentions[name] in (None, "neg"), (name, text)
    for sent in sentences(text):
        low = sent.lower()
        named = {n for n, terms in TEMPLATE_TERMS.items() if any(re.search(rf"\b{re.escape(t)}\b", low) for t in terms)}
        if _NEG_CUES.search(low):
            assert not (named & present), f"negates a present finding: {sent!r}"
        else:
            assert named <= present, f"asserts an absent finding: {sent!r}"
    for f in findings:
        if f.name != "atrophy":
            assert f.laterality in text.lower() and (f.region.split()[0][:5] in text.lower()), (f, text)
        if f.name in ("mass", "haemorrhage"):
            a = f.size_cm[0]
            assert f"{a:.1f}" in text or f"{a * 10:.0f} x" in text, (f.size_cm, text)


def test_reports_mention_exactly_the_findings_present(consortium):
    from hlip_fed.synth.findings import Finding
    from hlip_fed.synth.truth import cohorts, load_records, site_dir

    for text, findings in _many_reports():
        _check_report(text, findings)
    for name in cohorts(consortium) + ["heldout"]:
        for rec in load_records(consortium, name):
            text = (site_dir(consortium, name) / rec["split"] / rec["study_id"] / "report.txt").read_text()
            _check_report(text, [Finding.from_json(f) for f in rec["findings"]])


def test_no_generated_report_is_truncated_by_any_model_preset():
    """Truncation cut second findings, negatives and impressions: every report the generator can
    write, the longest included (all four findings, every sequence, each style), fits the context."""
    from hlip_fed.config import load_config, model_presets
    from hlip_fed.model import create_tokenizer
    from hlip_fed.synth.anatomy import head_atlas
    from hlip_fed.synth.findings import draw_findings
    from hlip_fed.synth.reports import STYLES, write_report

    rng = np.random.default_rng(3)
    atlas = head_atlas()
    texts = [text for text, _ in _many_reports(60)]
    for style in STYLES:
        for modality, seqs in (("CT", []), ("MR", ["T1", "T2", "FLAIR", "T1C"])):
            for _ in range(5):
                findings = draw_findings(atlas, {f: 1 for f in FINDINGS}, rng)
                texts.append(write_report(findings, modality, seqs, style, rng, 5.0))
    for preset in model_presets():
        cfg = load_config(preset).model
        tok = create_tokenizer(cfg)
        longest = max(len(tok.hf(cfg.text.prefix + t)["input_ids"]) for t in texts)
        assert longest <= cfg.text.context_length, (preset, longest, cfg.text.context_length)


def test_prompts_use_held_out_wording(consortium):
    from hlip_fed.synth.prompts import PROMPT_TERMS, PROMPTS
    from hlip_fed.synth.reports import TEMPLATE_TERMS

    reports = [t for t, _ in _many_reports(60)]
    reports += [p.read_text() for p in consortium.rglob("report.txt")]
    prompt_texts = [p for pair in PROMPTS.values() for side in pair.values() for p in side]
    for text in reports:
        low = text.lower()
        assert not any(re.search(rf"\b{t}\b", low) for t in PROMPT_TERMS), text
        assert not any(p.lower() in low for p in prompt_texts)
    for p in prompt_texts:
        low = p.lower()
        assert any(re.search(rf"\b{t}\b", low) for t in PROMPT_TERMS) or low.startswith(("normal", "no ")), p
        for terms in TEMPLATE_TERMS.values():
            assert not any(re.search(rf"\b{re.escape(t)}\b", low) for t in terms), p


# --- sites differ ---------------------------------------------------------------------------------

def test_sites_differ_in_case_mix():
    from hlip_fed.synth.consortium import plan_consortium
    from hlip_fed.synth.sites import preset

    specs, cohorts = plan_consortium(preset("benchmark"), 0)
    prev = {name: {f: np.mean([p.labels[f] for p in plans]) for f in FINDINGS} for name, plans in cohorts.items()}
    assert prev["northgate-stroke"]["infarct"] > 3 * prev["riverside-oncology"]["infarct"]
    assert prev["riverside-oncology"]["mass"] > 3 * prev["northgate-stroke"]["mass"]
    assert prev["lakeside-memory"]["atrophy"] > 2 * prev["st-mary-general"]["atrophy"]
    sizes = {name: len(plans) for name, plans in cohorts.items() if name != "heldout"}
    assert max(sizes.values()) > 1.5 * min(sizes.values())
    assert all(sum(p.labels[f] for p in cohorts["heldout"]) >= 30 for f in FINDINGS)


def test_sites_differ_in_intensity_and_vocabulary(consortium):
    from hlip_fed.data.readers import read_scan
    from hlip_fed.synth.truth import cohorts, load_records, site_dir

    stats, vocab = {}, {}
    for name in cohorts(consortium):
        p99, words = [], set()
        for rec in load_records(consortium, name):
            folder = site_dir(consortium, name) / rec["split"] / rec["study_id"]
            words |= set(re.findall(r"[a-z]+", (folder / "report.txt").read_text().lower()))
            first = rec["scans"][0]
            vol = read_scan(folder / first["name"])
            p99.append(float(np.percentile(vol.array, 99)))
            stats.setdefault(name + ":modality", vol.modality)
            stats.setdefault(name + ":spacing", vol.spacing)
        stats[name] = float(np.median(p99))
        vocab[name] = words
    names = cohorts(consortium)
    mr = [n for n in names if stats[n + ":modality"] == "MR"]
    assert len(mr) >= 2 and max(stats[n] for n in mr) > 1.5 * min(stats[n] for n in mr)
    assert len({stats[n + ":spacing"] for n in names}) == len(names)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            jaccard = len(vocab[a] & vocab[b]) / len(vocab[a] | vocab[b])
            assert jaccard < 0.7, (a, b, jaccard)


# --- formats --------------------------------------------------------------------------------------

def test_dicom_site_reads_back_with_correct_geometry(consortium):
    import pydicom

    from hlip_fed.data.readers import read_scan
    from hlip_fed.data.volume import make_volume
    from hlip_fed.synth.consortium import plan_consortium
    from hlip_fed.synth.render import render_study
    from hlip_fed.synth.sites import preset
    from hlip_fed.synth.truth import load_consortium

    desc = load_consortium(consortium)
    site = next(s for s in desc["sites"] if s["format"] == "dicom")
    _, cohorts = plan_consortium(preset("demo", SITES, 4, 4), 7)
    plan = cohorts[site["name"]][0]
    study = render_study(plan)
    folder = consortium / site["path"] / plan.split / plan.study_id
    for scan in study.scans:
        series = folder / scan.name
        files = sorted(series.glob("*.dcm"))
        assert len(files) == scan.array.shape[2]  # one file per slice
        ds = pydicom.dcmread(files[0])
        assert ds.Modality == "CT" and float(ds.RescaleIntercept) == -1024 and ds.pixel_array.dtype == np.int16
        assert float(ds.SliceThickness) == pytest.approx(scan.slice_mm)
        assert len({pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}) == len(files)
        vol = read_scan(series)
        expected = make_volume(np.clip(np.round(scan.array), -1024, 3071), scan.affine, "CT", "mem")
        assert vol.modality == "CT"
        assert vol.shape == expected.shape
        np.testing.assert_allclose(vol.affine, expected.affine, atol=1e-3)
        np.testing.assert_allclose(vol.spacing, expected.spacing, atol=1e-4)
        np.testing.assert_array_equal(vol.array, expected.array)
        assert vol.orientation == "SAR"


def test_nifti_sites_store_other_orientations_with_correct_affines(consortium):
    import nibabel as nib

    from hlip_fed.data.readers import read_scan
    from hlip_fed.synth.truth import load_consortium

    desc = load_consortium(consortium)
    for site in desc["sites"]:
        if site["format"] != "nifti":
            continue
        path = next((consortium / site["path"]).rglob("*.nii.gz"))
        img = nib.load(str(path))
        assert "".join(nib.aff2axcodes(img.affine)) == site["scanner"]["orientation"]
        sidecar = json.loads(path.with_name(path.name[:-7] + ".json").read_text())
        assert sidecar["modality"] == site["modality"]
        vol = read_scan(path)
        assert vol.orientation == "SAR" and vol.spacing[0] == pytest.approx(site["scanner"]["slice_mm"])


def test_probe_runs_on_a_consortium(consortium):
    from hlip_fed.synth.probe import format_result, run_probe

    result = run_probe(consortium, img_size=(16, 48, 48))
    assert set(result["pooled"]) == set(FINDINGS) | {"mean"}
    assert "pooled" in format_result(result)


def test_probe_reads_intensities_not_normalised_inputs(tmp_path):
    """The probe's CT histogram puts a brain just above mid-window in the bin just above the middle,
    whatever the model's scalar normalisation."""
    import nibabel as nib

    from hlip_fed.config import DataConfig
    from hlip_fed.synth.probe import scan_features, study_features

    lo, hi = DataConfig().ct_window
    hu = lo + 0.525 * (hi - lo)
    nib.save(nib.Nifti1Image(np.full((24, 24, 12), hu, np.float32), np.diag([2.0, 2.0, 4.0, 1.0])),
             str(tmp_path / "ct.nii.gz"))
    (tmp_path / "ct.json").write_text(json.dumps({"modality": "CT", "sequence": "CT"}))
    size = (8, 16, 16)
    feats = study_features(tmp_path, [{"sequence": "CT", "name": "ct.nii.gz"}], DataConfig(), size)
    n = len(scan_features(np.zeros(size, np.float32))) + 1
    hist = feats[4 * n: 4 * n + 20]  # CT is the fifth contrast; its histogram has 20 bins over [0, 1]
    assert hist[10] == pytest.approx(1.0)


def test_lesion_conspicuity_scores_focal_lesions_against_normal_studies(consortium):
    from hlip_fed.synth.probe import FOCAL, format_conspicuity, lesion_conspicuity, model_input_studies

    site = json.loads((consortium / "consortium.json").read_text())["sites"][2]["name"]  # an MRI site
    result = lesion_conspicuity(model_input_studies(consortium, site, img_size=(16, 48, 48)), min_null=2)
    assert result and set(result) <= set(FOCAL)
    for per in result.values():
        for r in per.values():
            assert r["n"] >= 1 and np.isfinite(r["median_z"]) and 0.0 <= r["frac_z_above_3"] <= 1.0
            assert -1.0 <= r["median_contrast"] <= 1.0
    assert "| finding | contrast |" in format_conspicuity(result)


def test_located_detector_reads_a_cohort_at_the_models_input(consortium):
    from hlip_fed.synth.probe import FOCAL, format_located, located_detector, model_input_studies

    site = json.loads((consortium / "consortium.json").read_text())["sites"][2]["name"]  # an MRI site
    result = located_detector(model_input_studies(consortium, site, img_size=(16, 48, 48)))
    assert set(result) == set(FOCAL)
    for r in result.values():
        assert all(r[k] is None or 0.0 <= r[k] <= 1.0 for k in ("study", "study_contrast"))
        for c in r["per_contrast"].values():
            assert c["pairs"] >= 1 and 0.0 <= c["asymmetry"] <= 1.0 and 0.5 <= c["contrast"] <= 1.0
    assert "| finding | contrast | pairs |" in format_located(result)


def _located_study(finding_label: int, image: np.ndarray, mask: np.ndarray | None, sequence: str = "T2") -> dict:
    masks = {} if mask is None else {"infarct": mask}
    return {"labels": {"mass": 0, "haemorrhage": 0, "infarct": finding_label, "atrophy": 0},
            "masks": masks, "scans": [(sequence, image)]}


def test_located_detector_ranks_a_visible_lesion_first_and_counts_ties_as_half():
    from hlip_fed.synth.probe import located_aucs

    rng = np.random.default_rng(0)
    mask = np.zeros((4, 8, 8), bool)
    mask[1:3, 2:4, 1:3] = True  # one hemisphere only
    normals = [_located_study(0, rng.uniform(0.4, 0.6, (4, 8, 8)).astype(np.float32), None) for _ in range(5)]
    lesions = []
    for sign in (1.0, 1.0, -1.0):  # a bright or a dark lesion: the asymmetry sees both
        x = rng.uniform(0.4, 0.6, (4, 8, 8)).astype(np.float32)
        x[mask] += sign * 0.4
        lesions.append(_located_study(1, x, mask))
    r = located_aucs(normals + lesions, "infarct")
    assert (r["n_pos"], r["n_neg"]) == (3, 5)
    assert r["per_contrast"]["T2"] == {"pairs": 15, "asymmetry": 1.0, "contrast": pytest.approx(2 / 3)}
    assert r["study"] == 1.0 and r["study_contrast"] == pytest.approx(2 / 3)  # the dark one loses

    flat = np.full((4, 8, 8), 0.5, np.float32)  # nothing to see: every pair ties
    r = located_aucs([_located_study(0, flat, None) for _ in range(4)] + [_located_study(1, flat, mask)], "infarct")
    assert r["per_contrast"]["T2"]["asymmetry"] == 0.5 and r["study"] == r["study_contrast"] == 0.5

    other = [_located_study(1, flat, mask, "FLAIR")] + [_located_study(0, flat, None)]  # no negative of its contrast
    assert located_aucs(other, "infarct") == {"n_pos": 1, "n_neg": 1, "per_contrast": {}, "study": None,
                                              "study_contrast": None}
