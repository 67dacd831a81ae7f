"""Inference commands end to end on the model that the demo's federated training saves.

The consortium: CT-like phantoms (an ellipsoid "brain" in air) where half the studies hold one
obvious lesion, bright or dark, small or large, left or right, at a random place; the report names
the size and side ("Large lesion in the left hemisphere.") but never the contrast; the ground truth
(lesion, contrast, size, side) and lesion masks sit outside the site folders, as in the phantom
consortium. Three hospitals federate with the demo run preset (tiny HLIP, the real MiniLM text
tower locked, FedAvg) through the project's ServerApp and ClientApp; the commands then read the
model folder the ServerApp saved and are scored on the held-out set and on a fourth hospital.
"""

import json
import math
import shlex

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from conftest import FP32
from hlip_fed.cli import main

# The demo run preset (tiny HLIP, the MiniLM text tower locked, FedAvg) at this consortium's scan
# size and with enough rounds to learn it: 3 sites x 12 rounds x 10 local steps of 16 studies, in
# fp32 on every CPU (the tower held in bf16 ends elsewhere, as another seed would).
DEMO_OVERRIDES = ["model.vision.img_size=[16,32,32]", "model.vision.patch_size=[4,8,8]", "federation.min_nodes=3",
                  "federation.rounds=12", "federation.local_steps=10", "train.batch_size=16", "train.lr=1e-3", *FP32]

SIDES = ("none", "left", "right")
NORMAL = "No focal abnormality."  # the report of a study without a lesion
PROMPTS = {"lesion": [NORMAL, "Lesion."]}
# These CT-like phantoms have no skull, and their bright lesions' noise (85 +- 30 HU) reaches bone's
# density: bone suppression off; the scans are already the model's size.
DATA_OVERRIDES = ["data.ct_window=[0.0, 100.0]", "data.ct_bone_hu=null", "data.fit=resize", "data.target_spacing=null",
                  "data.mean=0.2", "data.std=0.2", "data.max_scans=2"]
DATA_YAML = ("data:\n  ct_window: [0.0, 100.0]\n  ct_bone_hu: null\n  fit: resize\n  target_spacing: null\n"
             "  mean: 0.2\n  std: 0.2\n  max_scans: 2\n")
# Three hospitals that federate, the public held-out set, and a hospital that did not take part and
# adapts the model with its own labels (finetune): (folder, cohort name, {split: studies}).
COHORTS = (("sites/site0", "site0", {"train": 50, "test": 10}), ("sites/site1", "site1", {"train": 50, "test": 10}),
           ("sites/site2", "site2", {"train": 50, "test": 10}), ("heldout", "heldout", {"test": 80}),
           ("newsite", "newsite", {"train": 60, "test": 60}))


def write_lesion_consortium(root, seed=0):
    """The consortium layout of :mod:`hlip_fed.synth` with easy CT-like phantoms (module docstring)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    shape, affine = (32, 32, 16), np.diag([2.0, 2.0, 4.0, 1.0])
    xx, yy, zz = np.meshgrid(*(np.arange(n) + 0.5 for n in shape), indexing="ij")
    brain = ((xx - 16) / 14.5) ** 2 + ((yy - 16) / 14) ** 2 + ((zz - 8) / 7.2) ** 2 <= 1.0
    for folder, name, splits in COHORTS:
        rows, masks = [], root / "truth" / "masks" / name
        masks.mkdir(parents=True)
        for split, n in splits.items():
            for i in range(n):
                sid = f"{name}-{split}-{i:03d}"
                kind = 0 if rng.random() < 0.5 else int(rng.integers(1, 3))  # none, bright, dark
                side, size = (int(rng.integers(1, 3)), int(rng.integers(0, 2))) if kind else (0, None)
                lesion = np.zeros(shape, bool)
                if kind:
                    cx = rng.uniform(8, 11) if side == 1 else rng.uniform(21, 24)
                    c = (cx, rng.uniform(11, 21), rng.uniform(6.5, 9.5))
                    r = (4.5, 4.5, 2.5) if size == 0 else (6.5, 6.5, 3.5)
                    lesion = (sum(((g - ci) / ri) ** 2 for g, ci, ri in zip((xx, yy, zz), c, r)) <= 1.0) & brain
                base = np.where(brain, 40.0, -1000.0) + lesion * (45.0 if kind == 1 else -30.0)
                study = root / folder / split / sid
                study.mkdir(parents=True)
                for k in range(1 + int(rng.random() < 0.2)):
                    vol = base + rng.normal(0, 5 + 2 * k, shape) + lesion * rng.normal(0, 30, shape)
                    nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), study / f"scan{k}.nii.gz")
                    (study / f"scan{k}.json").write_text('{"modality": "CT"}')
                words = f"{'Small' if size == 0 else 'Large'} lesion in the {SIDES[side]} hemisphere."
                (study / "report.txt").write_text(words if kind else "No focal abnormality.")
                nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), masks / f"{sid}.nii.gz")
                rows.append({"study_id": sid, "split": split, "labels": {
                    "lesion": int(kind > 0), "contrast": kind - 1 if kind else None, "size": size, "side": side}})
        (root / "truth" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompts.json").write_text(json.dumps(PROMPTS))
    (root / "data.yaml").write_text(DATA_YAML)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(consortium root, model folder) after the demo's federated training on the easy consortium."""
    from simulations.inprocess import run_federation

    root = write_lesion_consortium(tmp_path_factory.mktemp("lesions"))
    run_config = {"config": "demo", "data-root": str(root), "run-dir": str(root / "run"),
                  "overrides": " ".join(shlex.quote(o) for o in DEMO_OVERRIDES + DATA_OVERRIDES + [
                      f"data.cache_dir={root / 'cache'}"])}
    run_federation(run_config, num_nodes=3)
    return root, root / "run" / "model"


def report(capsys, text):
    """Show a measured figure in the test log (``pytest -s``) despite capsys."""
    with capsys.disabled():
        print("\n" + text)


def run_json(capsys, argv):
    capsys.readouterr()  # drop what the test printed so far
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_predict_picks_the_finding_and_reports_calibration(trained, capsys):
    root, model = trained
    out = run_json(capsys, ["predict", "--model", str(model), "--config", str(root / "data.yaml"),
                            str(root / "heldout"), "--split", "test", "--labels", "No focal abnormality.,Lesion.",
                            "--labels-file", str(root / "truth" / "heldout.jsonl"), "--finding", "lesion",
                            "--calibration-out", str(root / "temperature.json"), "--json"])
    cal = out["calibration"]
    report(capsys, f"predict: accuracy {cal['accuracy']:.3f} (all {cal['accuracy_all']:.3f}, chance {cal['chance']:.3f}); "
          f"ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f} (T={cal['temperature']:.3g})")
    assert len(out["studies"]) == 80 and cal["n_calibration"] + cal["n_evaluation"] == 80
    # Above the commonest class's share (~0.59) beyond chance. The run's accuracy depends on the CPU's
    # kernels (0.85 with AVX-512, 0.80 with AVX2), so a binomial test, not a fixed margin.
    hits = round(cal["accuracy_all"] * 80)
    assert binomtest(hits, 80, cal["chance"], alternative="greater").pvalue < 1e-3
    assert all(math.isfinite(cal[k]) for k in ("ece_before", "ece_after", "temperature"))
    row = out["studies"][0]
    assert abs(sum(row["probabilities"].values()) - 1) < 1e-5 and row["truth"] in row["probabilities"]
    # a fitted temperature file applies to later predictions, and a single NIfTI file is a study
    scan = root / "heldout" / "test" / "heldout-test-000" / "scan0.nii.gz"
    again = run_json(capsys, ["predict", "--model", str(model), "--config", str(root / "data.yaml"), str(scan),
                              "--labels", "No focal abnormality.,Lesion.", "--temperature", str(root / "temperature.json"),
                              "--json"])
    assert again["temperature"] == pytest.approx(cal["temperature"]) and again["studies"][0]["study_id"] == "scan0"
    assert main(["predict", "--model", str(model), str(scan), "--labels", "only-one"]) == 2
    assert "two class names" in capsys.readouterr().err


def own_report_first(results, reports):
    """Queries whose top-ranked report is their own, and each query's chance of that.

    Identical report texts are one document (their embeddings, hence scores, are identical), so a
    query hits when the top score belongs to its own text alone; a random ranking puts that text
    first with probability (studies with that text) / (all studies)."""
    texts = list(reports.values())
    hits, chance = 0, []
    for r in results:
        own = reports[r["query"]]
        best = max(m["score"] for m in r["matches"])
        hits += {reports[m["id"]] for m in r["matches"] if m["score"] >= best - 1e-6} == {own}
        chance.append(texts.count(own) / len(texts))
    return hits, np.array(chance)


def test_retrieve_ranks_the_own_report_first_more_often_than_chance(trained, capsys, tmp_path):
    from hlip_fed.downstream.explain import poisson_binomial_sf
    from hlip_fed.downstream.inference import find_studies

    root, model = trained
    test_dir = root / "heldout" / "test"
    reports = {s.study_id: s.report for s in find_studies([test_dir])}
    n = len(reports)
    out = run_json(capsys, ["retrieve", "--model", str(model), "--config", str(root / "data.yaml"),
                            "--query", str(test_dir), "--reports", str(test_dir), "-k", str(n), "--json"])
    hits, chance = own_report_first(out["results"], reports)
    p_value = poisson_binomial_sf(chance, hits)
    report(capsys, f"retrieve: own report first for {hits}/{n} queries (chance {chance.mean():.3f}), p = {p_value:.2g}")
    assert len(out["results"]) == n and all(len(r["matches"]) == n for r in out["results"]) and p_value < 0.01
    # the reverse direction, with a corpus cache that the second call reuses
    cache = tmp_path / "emb.pt"
    argv = ["retrieve", "--model", str(model), "--config", str(root / "data.yaml"), "--text", "Large lesion in the left hemisphere.",
            "--studies", str(test_dir), "-k", "5", "--cache", str(cache), "--json"]
    first = run_json(capsys, argv)
    second = run_json(capsys, argv)
    assert first["cache"]["embedded"] == n and second["cache"] == {"path": str(cache), "reused": n, "embedded": 0}
    assert [m["id"] for m in first["results"][0]["matches"]] == [m["id"] for m in second["results"][0]["matches"]]
    truth = {json.loads(x)["study_id"]: json.loads(x)["labels"] for x in (root / "truth" / "heldout.jsonl").read_text().splitlines()}
    assert sum(truth[m["id"]]["lesion"] for m in first["results"][0]["matches"]) >= 4


def test_finetune_beats_zero_shot_with_ten_shots(trained, capsys, tmp_path):
    """A hospital outside the federation adapts the model with its own labels, for what no report
    says: whether a lesion is brighter or darker than the brain. Zero-shot can only guess at it."""
    root, model = trained
    out = run_json(capsys, ["finetune", "--model", str(model), "--config", str(root / "data.yaml"),
                            "--data", str(root / "newsite"), "--labels-file", str(root / "truth" / "newsite.jsonl"),
                            "--finding", "contrast", "--labels", "Bright lesion.,Dark lesion.", "--shots", "1,10",
                            "--repeats", "2", "--steps", "20", "--out", str(tmp_path / "fs"), "--json"])
    zero = out["zero_shot"]["balanced_accuracy"]
    ten = {s["method"]: s["balanced_accuracy"] for s in out["summary"] if s["shots"] == 10}
    report(capsys, f"finetune (contrast, 10 shots/class, balanced accuracy): zero-shot {zero:.3f}, probe {ten['probe']:.3f}, "
          f"full {ten['full']:.3f}")
    assert max(ten.values()) > zero
    assert {p.name for p in (tmp_path / "fs").iterdir()} >= {"fewshot.md", "fewshot.json", "fewshot.png", "probe.json"}
    assert json.loads((tmp_path / "fs" / "probe.json").read_text())["classes"] == ["Bright lesion.", "Dark lesion."]


def test_explain_puts_its_strongest_patch_on_the_lesion(trained, capsys, tmp_path):
    import nibabel as nib

    from hlip_fed.downstream.explain import foreground_mask, lesion_hit, lesion_hit_test, patch_scores
    from hlip_fed.downstream.inference import find_studies, load_data_config, load_model, load_study_tensor

    root, model_dir = trained
    model, tok = load_model(model_dir)
    data_cfg = load_data_config(root / "data.yaml")
    results = []
    for s in find_studies([root / "heldout"], split="test"):
        if s.report.startswith("No"):
            continue
        images, _ = load_study_tensor(s, data_cfg, model.cfg.vision.img_size)
        scores, _ = patch_scores(model, tok, images, s.report, versus=NORMAL)
        lesion = np.asarray(nib.load(root / "truth" / "masks" / "heldout" / f"{s.study_id}.nii.gz").dataobj).transpose(2, 1, 0) > 0
        results.append(lesion_hit(scores[0], lesion, foreground_mask(images[0, 0].numpy())))
    test = lesion_hit_test(results)
    report(capsys, f"explain: strongest patch on the lesion {test.hits}/{test.n} = {test.hit_rate:.2f} "
          f"(random brain patch {test.chance_rate:.2f}), p = {test.p_value:.2g}")
    assert test.n >= 20 and test.p_value < 0.05
    study = root / "heldout" / "test" / "heldout-test-001"
    out = run_json(capsys, ["explain", "--model", str(model_dir), "--config", str(root / "data.yaml"), str(study),
                            "--text", "Lesion.", "--versus", NORMAL, "--out", str(tmp_path / "maps.png"), "--nifti", str(tmp_path / "maps"), "--json"])
    assert out["versus"] == NORMAL and out["study"] == "heldout-test-001"
    assert (tmp_path / "maps.png").stat().st_size > 1000 and len(out["nifti"]) == len(out["scans"])
    assert nib.load(out["nifti"][0]).shape == (16, 32, 32)  # the scan as read: canonical S, A, R


def test_studies_are_found_as_files_folders_sites_and_manifests(mini_consortium):
    from hlip_fed.data.manifest import index_site, write_manifest
    from hlip_fed.downstream.inference import find_studies
    from hlip_fed.errors import HlipError

    site = mini_consortium / "sites" / "site0"
    study = site / "train" / "s0-train-1"
    assert [s.study_id for s in find_studies([study])] == ["s0-train-1"] and find_studies([study])[0].report
    assert len(find_studies([site])) == 6 and len(find_studies([site], split="test")) == 2
    manifest = write_manifest(index_site(site), mini_consortium / "m.jsonl")
    assert sorted(s.study_id for s in find_studies([manifest])) == sorted(s.study_id for s in find_studies([site]))
    assert len(find_studies([mini_consortium / "heldout"])) == 4
    ids = [s.study_id for s in find_studies([study, study])]
    assert ids == ["s0-train-1", "s0-train-1~2"]
    with pytest.raises(HlipError, match="not found"):
        find_studies([mini_consortium / "nope"])


def test_temperature_scaling_fixes_an_overconfident_classifier():
    from hlip_fed.downstream.predict import calibration_report, expected_calibration_error, fit_temperature, softmax

    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 1.5, (4000, 3))
    y = np.array([rng.choice(3, p=p) for p in softmax(true_logits)])  # calibrated at T = 1
    over = 4.0 * true_logits  # the same ranking, four times too confident
    assert fit_temperature(over, y) == pytest.approx(4.0, rel=0.15)
    rep = calibration_report(over, y)
    assert rep["ece_after"] < rep["ece_before"] / 2 and rep["nll_after"] < rep["nll_before"]
    assert expected_calibration_error(softmax(true_logits), y) < 0.05


def test_the_probe_becomes_a_head_with_the_same_probabilities():
    from sklearn.linear_model import LogisticRegression

    from hlip_fed.downstream.finetune import probe_head

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    for classes in (2, 3):
        y = rng.integers(0, classes, 60)
        probe = LogisticRegression(max_iter=1000).fit(x, y)
        weight, bias = probe_head(probe, classes)
        probs = torch.softmax(torch.from_numpy(x) @ weight.T + bias, dim=1).numpy()
        assert np.allclose(probs, probe.predict_proba(x), atol=1e-5)
    assert probe_head(LogisticRegression().fit(x, rng.integers(0, 2, 60)), 3) is None  # a class never drawn
    assert probe_head(None, 2) is None


def test_an_unreadable_study_is_skipped_and_the_others_embed_as_they_do_alone(mini_consortium, tiny_cfg, tmp_path):
    import dataclasses
    import shutil

    from hlip_fed.downstream.inference import embed_studies, find_studies
    from hlip_fed.model import create_model

    model = create_model(dataclasses.replace(tiny_cfg.model, vision=dataclasses.replace(
        tiny_cfg.model.vision, img_size=[16, 32, 32])), seed=0)
    broken = tmp_path / "broken"
    shutil.copytree(mini_consortium / "sites" / "site0" / "train" / "s0-train-1", broken)
    for scan in broken.glob("*.nii*"):
        scan.write_bytes(b"not a NIfTI file")
    studies = find_studies([mini_consortium / "sites" / "site0"], split="train")
    mixed = studies[:2] + find_studies([broken]) + studies[2:]
    emb, kept, skipped = embed_studies(model, mixed, tiny_cfg.data, batch_size=2)
    assert [s.study_id for s in kept] == [s.study_id for s in studies]
    assert all(a is b for a, b in zip(kept, studies))  # the caller's own Study objects, in order
    assert list(skipped) == ["broken"] and "broken" in skipped["broken"]
    alone = torch.cat([embed_studies(model, [s], tiny_cfg.data)[0] for s in studies])
    torch.testing.assert_close(emb, alone, atol=1e-5, rtol=1e-4)
