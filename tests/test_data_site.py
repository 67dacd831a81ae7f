"""Site folder: index/manifest, check, dataset + collate, cache, and the site/volume commands."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from hlip_fed.cli import main
from hlip_fed.config import DataConfig
from hlip_fed.data import DataError
from hlip_fed.data.check import check_site
from hlip_fed.data.dataset import SiteDataset, collate_studies
from hlip_fed.data.dicom_writer import write_dicom_series
from hlip_fed.data.manifest import index_site, read_manifest, write_manifest

IMG = (8, 16, 16)


def _mr(path: Path, seed: int, sequence: str | None = None, shape=(12, 14, 10)) -> None:
    a = np.random.default_rng(seed).gamma(2.0, 50.0, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(a, np.diag([1.2, 1.2, 3.0, 1.0])), path)
    if sequence:
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps({"modality": "MR", "sequence": sequence}))


def _study(site: Path, split: str, sid: str, report: str | None = "No acute findings.") -> Path:
    d = site / split / sid
    d.mkdir(parents=True)
    if report is not None:
        (d / "report.txt").write_text(report)
    return d


@pytest.fixture
def site(tmp_path) -> Path:
    site = tmp_path / "site"
    s1 = _study(site, "train", "s1", "Small T2 hyperintensity in the left frontal lobe.")
    _mr(s1 / "t1.nii.gz", 1, "T1")
    _mr(s1 / "t2.nii.gz", 2, "T2")
    s2 = _study(site, "train", "s2", "Normal head CT.")
    ct = np.random.default_rng(3).integers(-1000, 80, (6, 12, 12)).astype(np.float32)
    axial = np.array([[0, 0, 0.8, 0], [0, 0.8, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]])  # axis 0 -> S
    write_dicom_series(ct, axial, s2 / "ct", "CT")
    s3 = _study(site, "train", "s3", "   ")  # empty report -> rejected
    _mr(s3 / "flair.nii.gz", 4)
    s4 = _study(site, "train", "s4", "Chronic infarct.")
    (s4 / "a_broken.nii.gz").write_bytes(b"not a nifti" * 50)  # one bad scan, one good
    _mr(s4 / "b_t1.nii.gz", 5, "T1")
    v1 = _study(site, "val", "v1", "Meningioma.")
    _mr(v1 / "t1c.nii.gz", 6, "T1C")
    t1 = _study(site, "test", "t1", None)  # no report -> rejected
    _mr(t1 / "t1.nii.gz", 7)
    return site


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_index_and_manifest_roundtrip(site, tmp_path):
    entries = index_site(site)
    by_id = {e["study_id"]: e for e in entries}
    assert sorted(by_id) == ["s1", "s2", "s3", "s4", "t1", "v1"]
    assert by_id["s1"]["scans"] == [
        {"path": "train/s1/t1.nii.gz", "format": "nifti", "modality": "MR", "sequence": "T1"},
        {"path": "train/s1/t2.nii.gz", "format": "nifti", "modality": "MR", "sequence": "T2"},
    ]
    assert by_id["s2"]["scans"][0] == {"path": "train/s2/ct", "format": "dicom-series", "modality": "CT", "sequence": None}
    assert by_id["v1"]["split"] == "val" and by_id["t1"]["report"] is None
    out = write_manifest(entries, tmp_path / "m.jsonl")
    assert read_manifest(out) == entries
    # report text kept in the manifest survives re-indexing
    by_id["t1"]["report_text"] = "Report from the RIS."
    again = {e["study_id"]: e for e in index_site(site, previous=entries)}
    assert again["t1"]["report_text"] == "Report from the RIS."


def test_check_site_lists_problems_and_never_writes(site):
    before = _tree_digest(site)
    report = check_site(site)
    assert (report.studies_ok, report.studies_bad) == (4, 2)  # s1 s2 s4 v1 | s3 t1
    assert report.scans_bad == 1 and report.splits == {"train": 3, "val": 1}
    errors = {Path(p["path"]).name: p["error"] for p in report.problems}
    assert errors["report.txt"] == "empty report"
    assert errors["t1"].startswith("missing report")
    assert "not a NIfTI file" in errors["a_broken.nii.gz"]
    assert _tree_digest(site) == before


def test_site_commands(site, capsys):
    assert main(["site", "index", str(site)]) == 0
    assert "indexed 6 studies (test 1, train 4, val 1)" in capsys.readouterr().out
    assert len(read_manifest(site / "manifest.jsonl")) == 6
    assert main(["site", "check", str(site), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["studies_ok"] == 4 and data["studies_bad"] == 2
    assert all({"path", "error"} <= set(p) for p in data["problems"])
    assert main(["site", "check", str(site)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"site {site}: 4 of 6 studies usable")
    assert sum(line.startswith("problem: ") for line in lines) == 3
    assert main(["site", "check", str(site), "--split", "test"]) == 1  # nothing usable there


def test_volume_info_command(site, capsys):
    assert main(["volume", "info", str(site / "train/s2/ct"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [6, 12, 12] and info["modality"] == "CT" and info["orientation"] == "SAR"
    assert info["spacing"] == pytest.approx([2.5, 0.8, 0.8])
    assert info["intensity"]["min"] >= -1000 and info["intensity"]["max"] < 80
    assert main(["volume", "info", str(site / "train/s1/t1.nii.gz")]) == 0
    assert "modality:    MR (T1)" in capsys.readouterr().out


def test_dataset_skips_rejected_studies_and_collates(site, caplog):
    cfg = DataConfig(max_scans=4)
    ds = SiteDataset(site, cfg, IMG, split="train")
    assert len(ds) == 4
    with caplog.at_level("WARNING", logger="hlip_fed.data"):
        items = [ds[i] for i in range(len(ds))]
    ids = [i[2] for i in items]
    assert ids == ["s1", "s2", "s4", "s4"]  # s3 (empty report) is replaced by the next usable study
    assert "s3" in ds.rejected and "empty report" in ds.rejected["s3"]
    assert any("a_broken.nii.gz" in r.getMessage() for r in caplog.records)
    assert items[0][0].shape == (2, 1, *IMG) and items[1][0].shape == (1, 1, *IMG)
    images, mask, reports, study_ids = collate_studies(items[:3])
    assert images.shape == (3, 2, 1, *IMG) and mask.tolist() == [[True, True], [True, False], [True, False]]
    assert torch.all(images[1, 1] == 0) and reports[1] == "Normal head CT." and study_ids == ["s1", "s2", "s4"]
    assert len(SiteDataset(site, DataConfig(max_scans=1), IMG)[0][0]) == 1
    held = collate_studies(items[:3], dtype=torch.bfloat16)  # for a tower held in bf16
    assert held[0].dtype == torch.bfloat16 and torch.equal(held[0], images.bfloat16())
    assert torch.equal(held[1], mask) and held[2:] == (reports, study_ids)


def test_training_draws_a_fixed_number_of_scans_in_random_order(site):
    cfg = DataConfig(max_scans=4, train_scans=3)
    plain = SiteDataset(site, cfg, IMG, split="train")[0][0]  # evaluation: manifest order, no sampling
    assert plain.shape[0] == 2
    train = SiteDataset(site, cfg, IMG, split="train", train=True)
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(12)]
    assert all(d.shape == (3, 1, *IMG) for d in draws)  # two scans repeated up to three
    for d in draws:  # every drawn scan is one of the study's, and both of them are drawn
        assert all(any(torch.equal(x, p) for p in plain) for x in d)
        assert all(any(torch.equal(x, p) for x in d) for p in plain)
    assert len({tuple(torch.equal(d[0], p) for p in plain) for d in draws}) == 2  # order varies
    torch.manual_seed(0)
    assert all(torch.equal(a, train[0][0]) for a in draws[:1])  # reproducible for a seed


def test_training_studies_are_augmented_and_evaluation_reads_them_plain(site, tmp_path):
    cfg = DataConfig(augment="light", cache_dir=str(tmp_path / "cache"))
    plain = SiteDataset(site, cfg, IMG, split="train")[0]
    train = SiteDataset(site, cfg, IMG, split="train", train=True)
    torch.manual_seed(0)
    draws = [train[0] for _ in range(8)]
    assert all(d[0].shape == plain[0].shape for d in draws)
    assert sum(not torch.equal(d[0], plain[0]) for d in draws) >= 6  # the affine alone fires 4 in 5
    reports = {d[1] for d in draws}  # s1 names the left frontal lobe; a mirror names the right
    assert reports == {plain[1], plain[1].replace("left", "right")}
    torch.manual_seed(0)
    assert torch.equal(train[0][0], draws[0][0])  # reproducible for a seed, cache hits included
    view = train.evaluation_view()
    assert torch.equal(view[0][0], plain[0]) and view[0][1] == plain[1] and train.augment


def test_the_cache_keeps_each_scans_left_right_axis(site, tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    ds = SiteDataset(site, cfg, IMG, split="train")
    fresh = ds.load_scan(site / "train/s2/ct")
    cached = SiteDataset(site, cfg, IMG, split="train").load_scan(site / "train/s2/ct")
    assert ds.cache.misses == 1 and fresh[1] == cached[1] == 2 and torch.equal(fresh[0], cached[0])


def test_dataset_with_no_usable_study(site):
    ds = SiteDataset(site, DataConfig(), IMG, split="test")
    with pytest.raises(DataError, match="no usable study"):
        ds[0]


def test_cache_second_epoch_reads_from_cache_and_sees_changes(site, tmp_path, monkeypatch):
    from hlip_fed.data import dataset

    calls = []
    real = dataset.read_scan
    monkeypatch.setattr(dataset, "read_scan", lambda p, **kw: calls.append(Path(p).name) or real(p, **kw))
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    ds = SiteDataset(site, cfg, IMG, split="val")
    first = ds[0][0]
    assert calls == ["t1c.nii.gz"] and ds.cache.misses == 1
    second = SiteDataset(site, cfg, IMG, split="val")[0][0]  # a new epoch / process
    assert calls == ["t1c.nii.gz"]  # nothing decoded
    torch.testing.assert_close(first, second)

    _mr(site / "val/v1/t1c.nii.gz", 99)  # the hospital replaces the file
    changed = SiteDataset(site, cfg, IMG, split="val")[0][0]
    assert calls == ["t1c.nii.gz", "t1c.nii.gz"] and not torch.equal(changed, first)

    other = DataConfig(cache_dir=str(tmp_path / "cache"), ct_window=[-100.0, 100.0])
    SiteDataset(site, other, IMG, split="val")[0]  # a changed preprocessing config misses too
    assert len(calls) == 3
    SiteDataset(site, DataConfig(cache_dir=str(tmp_path / "cache"), num_workers=2), IMG, split="val")[0]
    assert len(calls) == 3  # settings that do not change the tensor keep the cache


def test_cache_keeps_read_tensors_in_memory_within_its_budget(site, tmp_path, monkeypatch):
    from hlip_fed.data.cache import TensorCache

    reads = []
    real = TensorCache._read
    monkeypatch.setattr(TensorCache, "_read", staticmethod(lambda p: reads.append(p) or real(p)))
    ds = SiteDataset(site, DataConfig(cache_dir=str(tmp_path / "cache")), IMG, split="val")
    first = ds[0][0]
    assert len(reads) == 1 and ds.cache.memory_left == (1024 << 20) - first.numel() * 4
    assert torch.equal(ds[0][0], first) and len(reads) == 1  # the second epoch reads no file
    plain = first.clone()
    first.add_(1.0)  # a study is stacked from its scans: changing it leaves the kept scan alone
    assert torch.equal(ds[0][0], plain)

    _mr(site / "val/v1/t1c.nii.gz", 99)  # a replaced source misses the memory tier too
    assert not torch.equal(ds[0][0], plain)

    small = SiteDataset(site, DataConfig(cache_dir=str(tmp_path / "cache"), memory_cache_mb=0), IMG, split="val")
    small[0], small[0]
    assert len(reads) == 4 and small.cache.memory_left == 0  # off: every read is a file read


def test_cache_covers_dicom_series_and_sidecars(site, tmp_path):
    from hlip_fed.data.cache import TensorCache

    cache = TensorCache(tmp_path / "c", DataConfig(), IMG)
    series = site / "train/s2/ct"
    before = cache.source_digest(series)
    assert cache.source_digest(series) == before
    (series / "IM0003.dcm").write_bytes((series / "IM0003.dcm").read_bytes()[:-2] + b"\x01\x00")
    assert cache.source_digest(series) != before
    nifti = site / "train/s1/t1.nii.gz"
    d1 = cache.source_digest(nifti)
    (site / "train/s1/t1.json").write_text('{"modality": "CT"}')
    assert cache.source_digest(nifti) != d1
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "c").rglob("*"))


def test_site_batches_never_mix_sites_and_cover_them_in_proportion():
    from hlip_fed.data.dataset import SiteBatchSampler

    sizes = [10, 25, 3, 17]
    sampler = SiteBatchSampler(sizes, 4, torch.Generator().manual_seed(0))
    edges = np.cumsum([0] + sizes)
    site_of = lambda i: int(np.searchsorted(edges, i, side="right") - 1)  # noqa: E731
    passes = [list(sampler) for _ in range(3)]
    for batches in passes:
        assert len(batches) == len(sampler) == 2 + 6 + 0 + 4
        assert all(len(b) == 4 and len({site_of(i) for i in b}) == 1 for b in batches)
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == len(flat)  # each study at most once a pass
        assert [sum(site_of(b[0]) == s for b in batches) for s in range(4)] == [2, 6, 0, 4]
    assert passes[0] != passes[1]  # a new order every pass ...
    again = SiteBatchSampler(sizes, 4, torch.Generator().manual_seed(0))
    assert list(again) == passes[0]  # ... reproducible for a seed
    with pytest.raises(ValueError, match="no site has a full batch"):
        SiteBatchSampler([3, 2], 4)


def test_sequences_choose_a_studys_scans_and_a_study_without_them_keeps_every_scan(site):
    every = SiteDataset(site, DataConfig(), IMG, split="train")
    chosen = SiteDataset(site, DataConfig(sequences=["T2"]), IMG, split="train")
    s1, s1_every = chosen[0][0], every[0][0]  # T1 and T2: the T2 alone, in training and evaluation
    assert s1.shape[0] == 1 and torch.equal(s1[0], s1_every[1])
    assert torch.equal(chosen[1][0], every[1][0])  # the CT study holds no T2: its CT is read
    assert torch.equal(chosen[2][0], every[2][0])  # s4's T1 (its broken scan still skipped)
    train = SiteDataset(site, DataConfig(sequences=["T2"], train_scans=2), IMG, split="train", train=True)
    assert all(torch.equal(x, s1_every[1]) for x in train[0][0])  # scan sampling draws from the T2 only


def test_inference_reads_the_sequences_a_model_was_trained_on(site):
    """``predict``, ``retrieve``, ``finetune`` and ``explain`` read a study's scans as training did:
    with ``data.sequences`` set, the listed sequences (named by the manifest or the scans' sidecars)
    and every scan of a study that holds none of them."""
    from hlip_fed.downstream.inference import find_studies, load_study_tensor

    cfg = DataConfig(sequences=["T2"])
    trained_on = SiteDataset(site, cfg, IMG, split="train")
    manifest = write_manifest(index_site(site), site / "listed.jsonl")
    for named in (site / "train" / "s1", site, manifest):  # a study folder, a site, a manifest
        study = next(s for s in find_studies([named]) if s.study_id == "s1")
        x, volumes = load_study_tensor(study, cfg, IMG)
        assert len(volumes) == 1 and torch.equal(x, trained_on[0][0])  # the T2 alone
    ct = find_studies([site / "train" / "s2"])[0]
    assert torch.equal(load_study_tensor(ct, cfg, IMG)[0], trained_on[1][0])  # no T2: its CT is read
    assert load_study_tensor(find_studies([site / "train" / "s1"])[0], DataConfig(), IMG)[0].shape[0] == 2
    entries = index_site(site)
    for scan in next(e for e in entries if e["study_id"] == "s1")["scans"]:
        scan["sequence"] = None  # the manifest, not the sidecar, says what a listed scan is
    unnamed = write_manifest(entries, site / "unnamed.jsonl")
    study = next(s for s in find_studies([unnamed]) if s.study_id == "s1")
    assert load_study_tensor(study, cfg, IMG)[0].shape[0] == 2
