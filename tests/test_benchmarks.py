"""Smoke tests of the benchmarks: each runs in a tiny configuration and writes valid JSON.
No timing is asserted; the figures of a real run are in docs/benchmarks.md."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"benchmarks.{Path(script).stem}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_flop_bound_matches_the_paper_sized_figures():
    from benchmarks.attention import bound, forward_macs, preset_spec

    vitb = preset_spec("vit_base_multiscan_h2_token1176")
    assert bound(vitb, "h2", 1) == pytest.approx(1.0)
    assert bound(vitb, "h2", 8) == pytest.approx(1.64, abs=0.02)
    assert bound(vitb, "h2", 40) == pytest.approx(2.44, abs=0.02)
    assert 2.9 < bound(vitb, "h2", 4000) < 3.0  # a third of the blocks stay study-wide
    levels = vitb.levels("h2")
    assert forward_macs(vitb, levels, 8, patch_dropout=0.5) < forward_macs(vitb, levels, 8)


def test_attention_benchmark_writes_json(tmp_path):
    out = tmp_path / "attention.json"
    proc = run("attention.py", "--quick", "--scans", "2", "--threads", "1", "--patch-dropout", "0.5",
               "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("throughput_ratio", "bound", "memory_ratio", "memory_ratio_math"):
        assert isinstance(data[key], float) and math.isfinite(data[key]), key
    layouts = {(r["kernel"], r["layout"]) for r in data["rows"] if "studies_per_s" in r}
    assert layouts == {(k, lay) for k in ("fused", "math") for lay in ("full", "h2", "h3")}
    assert [r["patch_dropout"] for r in data["patch_dropout"]] == [0.0, 0.5]
    assert "| scans | layout |" in proc.stdout
    # The figures are the rows' own: every ratio is a quotient of two measured rows, and each
    # layout's FLOP bound is the analytic count relative to study-wide attention.
    rows = {(r["kernel"], r["layout"]): r for r in data["rows"] if "studies_per_s" in r}
    for (kernel, layout), r in rows.items():
        full = rows[(kernel, "full")]
        assert r["speedup"] == pytest.approx(r["studies_per_s"] / full["studies_per_s"])
        assert r["memory_ratio"] == pytest.approx(r["peak_mb"] / full["peak_mb"])
        assert r["of_bound"] == pytest.approx(r["speedup"] / r["bound"])
        assert r["bound"] == 1.0 if layout == "full" else r["bound"] > 0
    assert data["throughput_ratio"] == pytest.approx(rows[("fused", "h2")]["speedup"])
    assert data["memory_ratio_math"] == pytest.approx(rows[("math", "h2")]["memory_ratio"])
    dropped = data["patch_dropout"][1]
    assert dropped["bound"] > 1.0 and dropped["speedup"] == pytest.approx(
        dropped["studies_per_s"] / data["patch_dropout"][0]["studies_per_s"])


def test_federation_benchmark_writes_json(tmp_path):
    out = tmp_path / "federation.json"
    proc = run("federation.py", "--quick", "--json", str(out), timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    data = json.loads(out.read_text())
    o = data["overhead"]
    assert len(o["flower"]["round_seconds"]) == len(o["direct"]["round_seconds"]) == 2
    assert o["overhead_ratio"] > 0 and data["bytes_per_site_per_round"] > 0
    # The ratio is the flower rounds over the direct ones, its median over the rounds after the first;
    # every site sends its federated arrays in fp32 (the default transport): four bytes a value.
    per_round = [f / d for f, d in zip(o["flower"]["round_seconds"], o["direct"]["round_seconds"])]
    assert o["ratio_per_round"] == pytest.approx(per_round) and o["overhead_ratio"] == pytest.approx(per_round[1])
    from hlip_fed.config import load_config
    from hlip_fed.federation.params import federated_keys
    from hlip_fed.model import create_model

    cfg = load_config(files=["demo"], overrides=o["overrides"])
    model = create_model(cfg.model, seed=0)
    values = sum(model.state_dict()[k].numel() for k in federated_keys(model, cfg.federation.groups))
    assert data["bytes_per_site_per_round"] == 4 * values
    # the round profile: one exchange a round, the last round's evaluation in its own, with the
    # sites' handlers inside them
    prof = o["flower"]["profile"]
    assert [r["round"] for r in prof] == [1, 2]
    assert "evaluate" not in prof[0] and "before_evaluate" not in prof[0]["server"]
    for r, kinds in zip(prof, [("train",), ("train", "evaluate")]):
        for kind in kinds:
            ex = r[kind]
            assert ex["messages"] == 2 and 0 < ex["busy"] <= ex["wall"] + 0.01 and ex["to_first_start"] >= -0.01
        assert r["server"]["heldout"] > 0
    assert prof[1]["server"]["before_evaluate"] >= 0
    assert prof[0]["server"]["before_train"] is None and prof[1]["server"]["before_train"] >= 0
    assert "where a Flower round goes" in proc.stdout
    assert data["process_per_message"]["fresh_process_seconds"] > 0
    assert [r["sites"] for r in data["scaling"]["runs"]] == [2]
    assert data["scaling"]["runs"][0]["peak_rss_mb"] > 0


def test_pretraining_benchmark_writes_its_curve(mini_consortium, tmp_path):
    import shlex

    from conftest import FAST_RUN

    out = tmp_path / "pretraining.json"
    proc = run("pretraining.py", str(mini_consortium), "--config", "", "--steps", "2", "--every", "1",
               "--overrides", " ".join(shlex.quote(o) for o in FAST_RUN), "--json", str(out), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    data = json.loads(out.read_text())
    assert [r["step"] for r in data["curve"]] == [1, 2] and data["heldout_studies"] == 4
    for row in data["curve"]:
        assert math.isfinite(row["loss"]) and 0.0 <= row["r5"] <= 1.0
        assert any(k.startswith("probe_") for k in row) and any(k.startswith("zs_") and k != "zs_mean" for k in row)
        assert any(k.startswith("zs@") for k in row) and any(k.startswith("probe@") for k in row)  # per modality
    assert "| step | epochs | train loss |" in proc.stdout
    assert data["site_batches"] is False and "sites mixed" in proc.stdout
    assert set(data["text_side"]) == {"report_probe", "prompt_vs_report"}
    sup = run("pretraining.py", str(mini_consortium), "--config", "", "--steps", "1", "--every", "1",
              "--objective", "supervised", "--overrides", " ".join(shlex.quote(o) for o in FAST_RUN), timeout=600)
    assert sup.returncode == 0, (sup.stdout + sup.stderr)[-3000:]
    assert "supervised head" in sup.stdout and "site test" in sup.stdout
    cnn_out = tmp_path / "pretraining-cnn.json"
    cnn = run("pretraining.py", str(mini_consortium), "--config", "", "--steps", "1", "--every", "1", "--tower", "cnn",
              "--sites", "site0,site2", "--overrides", " ".join(shlex.quote(o) for o in FAST_RUN),
              "--json", str(cnn_out), timeout=600)
    assert cnn.returncode == 0, (cnn.stdout + cnn.stderr)[-3000:]
    cnn_data = json.loads(cnn_out.read_text())
    assert cnn_data["tower"] == "cnn" and cnn_data["tower_params"] != data["tower_params"]
    assert data["sites"] == ["site0", "site1", "site2"] and cnn_data["sites"] == ["site0", "site2"]
    assert cnn_data["training_studies"] < data["training_studies"]
    assert cnn_data["heldout_studies"] == data["heldout_studies"]  # every held-out study is MR, as the sites' are
    assert math.isfinite(cnn_data["curve"][0]["loss"])


def test_site_test_auc_is_scored_within_each_site():
    """A score that only tells the sites apart ranks a mass-heavy site's studies first: pooled over
    sites its AUC is high, within each site it is chance; a score that finds the mass is 1 in both."""
    import numpy as np

    from benchmarks.pretraining import within_site_aucs

    site_labels = {"oncology": {f"o{i}": {"mass": int(i < 6)} for i in range(8)},
                   "general": {f"g{i}": {"mass": int(i < 2)} for i in range(8)}}
    ids = [*site_labels["oncology"], *site_labels["general"]]
    by_site = np.array([[1.0 if i.startswith("o") else 0.0] for i in ids])
    assert within_site_aucs(ids, by_site, site_labels, ["mass"])["auc-mass"] == pytest.approx(0.5)
    labels = {**site_labels["oncology"], **site_labels["general"]}
    by_mass = np.array([[float(labels[i]["mass"])] for i in ids])
    assert within_site_aucs(ids, by_mass, site_labels, ["mass"])["auc-mass"] == pytest.approx(1.0)
    one_class = {"oncology": site_labels["oncology"], "memory": {"m0": {"mass": 0}, "m1": {"mass": 0}}}
    scores = np.array([[float(one_class["oncology"][i]["mass"])] for i in one_class["oncology"]] + [[0.3], [0.7]])
    assert within_site_aucs([*one_class["oncology"], "m0", "m1"], scores, one_class, ["mass"])["auc-mass"] == 1.0


def test_cnn_reference_writes_train_site_test_and_heldout_aucs(mini_consortium, tmp_path):
    from hlip_fed.synth.truth import load_records

    out = tmp_path / "cnn.json"
    proc = run("cnn_reference.py", str(mini_consortium), "--config", "", "--steps", "2", "--every", "1",
               "--overrides", "model.vision.img_size=[16,32,32] train.batch_size=2", "--json", str(out), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    data = json.loads(out.read_text())
    assert [r["step"] for r in data["curve"]] == [1, 2] and data["heldout_studies"] == 4
    for row in data["curve"]:
        assert math.isfinite(row["loss"])
        assert any(k.startswith("heldout_") for k in row) and any(k.startswith("train_") for k in row)
        assert any(k.startswith("site_test_") for k in row)  # the sites' own scanners, unseen studies
    assert data["site_test_studies"] == sum(len(load_records(mini_consortium, s, "test")) for s in data["sites"]) > 0
    assert "| step | epochs | train BCE |" in proc.stdout and "site test" in proc.stdout
    assert data["site_batches"] is False and "sites mixed" in proc.stdout
    one_site = run("cnn_reference.py", str(mini_consortium), "--config", "", "--steps", "1", "--every", "1", "--overrides",
                   "model.vision.img_size=[16,32,32] train.batch_size=2 train.site_batches=true", timeout=600)
    assert one_site.returncode == 0 and "each from one site" in one_site.stdout, one_site.stderr[-2000:]
    bad = run("cnn_reference.py", str(mini_consortium), "--config", "", "--sites", "nowhere", timeout=600)
    assert bad.returncode == 2 and "no site nowhere" in bad.stderr and "Traceback" not in bad.stderr
    none = run("cnn_reference.py", str(mini_consortium), "--config", "", "--sequences", "DWI", timeout=600)
    assert none.returncode == 2 and "no DWI scan" in none.stderr and "Traceback" not in none.stderr


def test_text_cache_benchmark_times_training_and_evaluation(mini_consortium, tmp_path):
    out = tmp_path / "text-cache.json"
    proc = run("text_cache.py", "--data", str(mini_consortium), "--quick", "--json", str(out), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    data = json.loads(out.read_text())
    s = data["summary"]
    assert s["losses_agree"] and s["eval_metrics_agree"]
    assert s["speedup_warm"] > 0 and s["eval_speedup"] > 0
    cached = [r for r in data["rows"] if r["variant"] == "cached"]
    assert cached[0]["encoded"] > 0 and all(r["eval_seconds"] > 0 for r in data["rows"])
    assert "evaluation (test split" in proc.stdout


@pytest.fixture(scope="module")
def five_sites(tmp_path_factory):
    """A small phantom consortium of five sites: the two CT archetypes (stroke centre, trauma
    centre) among them, and CT and MR studies in its held-out set."""
    from hlip_fed.cli import main

    data = tmp_path_factory.mktemp("synth") / "c"
    assert main(["synth", "--out", str(data), "--sites", "5", "--studies", "2", "--heldout", "8", "--seed", "3",
                 "--workers", "1", "--no-preview"]) == 0
    return data


def test_cnn_reference_on_some_sites_scores_the_heldout_studies_of_their_modality(five_sites, tmp_path):
    from hlip_fed.synth.truth import load_records

    ct = [s for s in (p.stem for p in sorted((five_sites / "truth").glob("*.jsonl"))) if s != "heldout"
          and {r["modality"] for r in load_records(five_sites, s)} == {"CT"}]
    heldout_ct = [r for r in load_records(five_sites, "heldout") if r["modality"] == "CT"]
    assert len(ct) == 2 and 0 < len(heldout_ct) < len(load_records(five_sites, "heldout"))
    out = tmp_path / "cnn.json"
    proc = run("cnn_reference.py", str(five_sites), "--config", "", "--steps", "1", "--every", "1",
               "--sites", ",".join(ct), "--overrides", "model.vision.img_size=[16,32,32] train.batch_size=2",
               "--json", str(out), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    data = json.loads(out.read_text())
    assert data["sites"] == ct and data["heldout_studies"] == len(heldout_ct)
    assert data["training_studies"] == sum(len(load_records(five_sites, s, "train")) for s in ct)


def test_inputs_benchmark_sees_bone_only_when_it_is_kept(five_sites, tmp_path):
    data = five_sites
    figures = {}
    for name, overrides in (("masked", ""), ("kept", "data.ct_bone_hu=null")):
        out = tmp_path / f"{name}.json"
        proc = run("inputs.py", str(data), "--studies", "2", "--overrides", overrides, "--json", str(out), timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        figures[name] = json.loads(out.read_text())
    for name, fig in figures.items():
        ct = [c for c in fig["cohorts"] if c["modality"] == "CT"]
        assert len(ct) == 3 and all(c["scans"] > 0 and 0 < c["grad99"] < 2 for c in ct)  # two sites + held-out
        assert 0.5 <= fig["sharpness_auc_ct_sites"] <= 1.0
    assert all(c["saturated"] < 0.01 for c in figures["masked"]["cohorts"] if c["modality"] == "CT")  # a bleed at most
    assert all(c["saturated"] > 0.05 for c in figures["kept"]["cohorts"] if c["modality"] == "CT")  # the skull


def test_data_benchmark_times_the_cache_and_each_augmentation(tmp_path):
    out = tmp_path / "data.json"
    proc = run("data.py", "--studies", "2", "--ct-shape", "8", "48", "48", "--mr-shape", "48", "48", "8",
               "--img-size", "8", "32", "32", "--json", str(out), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    data = json.loads(out.read_text())
    paths = [r["path"] for r in data["results"]]
    assert paths[-4:] == [f"cached epoch, augment={preset}" for preset in ("light", "rigid", "scanner", "intensity")]
    assert all(r["seconds"] > 0 for r in data["results"])
    names = {r["transform"] for r in data["augmentation_ms"]}
    assert {"RandLateralFlipd", "RandAffined", "Rand3DElasticd", "RandBiasFieldd"} <= names
    assert all(r["ms_per_study"] > 0 for r in data["augmentation_ms"])


def test_throughput_benchmark_measures_each_lever_on_the_same_training(mini_consortium, tmp_path):
    from benchmarks.attention import ModelSpec
    from benchmarks.throughput import CATEGORIES, step_flops
    from hlip_fed.training.train import native_bf16

    out = tmp_path / "throughput.json"
    proc = run("throughput.py", "--data", str(mini_consortium), "--quick", "--presets", "demo", "--batch", "2",
               "--json", str(out), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    data = json.loads(out.read_text())
    demo = data["presets"]["demo"]
    rows = {r["variant"]: r for r in demo["rows"]}
    held = bool(native_bf16())  # train.precision: auto, the default, holds the tower in bf16 on such a CPU
    other = "defaults in fp32" if held else "defaults + bf16-held tower"
    assert list(rows) == ["baseline", "+ linear patch embedding", "+ skip padded scans", "+ fused AdamW",
                          "+ scans kept in memory", "+ bf16 autocast", "defaults", "defaults + Conv3d patch embedding",
                          other, "defaults + DataLoader worker"]
    defaults = "bf16-held" if held else "fp32"
    assert rows["defaults"]["precision"] == rows["defaults + Conv3d patch embedding"]["precision"] == defaults
    assert rows[other]["precision"] == ("fp32" if held else "bf16-held")
    assert rows["+ bf16 autocast"]["precision"] == "bf16"
    assert data["speedup"] == pytest.approx(rows["defaults"]["studies_per_s"] / rows["baseline"]["studies_per_s"])
    assert all(r["data_ms"] < r["step_ms"] for r in rows.values())
    # The fp32 levers compute the same function: the same seeds give the same training losses.
    curves = demo["loss_curves"]["curves"]
    for base, new in zip(curves["baseline"], curves["defaults in fp32" if held else "defaults"]):
        assert base == pytest.approx(new, abs=1e-3)
    assert demo["loss_curves"]["within_seed_noise"]
    assert set(demo["loss_curves"]["shifts"]) == {"defaults", other}
    prof = demo["profile_seconds_per_step"]
    assert set(prof["defaults"]) == set(CATEGORIES) and prof["defaults"]["data"] > 0
    assert prof["baseline"]["optimiser"] > 0 and prof["defaults"]["attention"] > 0
    v = demo["vision_step"]
    spec = ModelSpec("quick", 96, 3, 3, [16, 32, 32], [8, 16, 16], 4.0)
    assert v["flops"] == pytest.approx(step_flops(spec, ["scan", "scan", "study"], v["scans_per_study"]))
    assert 0 < data["roofline_fraction"] < 1
    assert data["gemm_peak_flop_per_s"]["fp32"] > 0 and "whole step speedup" in proc.stdout


def test_flops_count_padded_scans_only_where_they_are_computed():
    from benchmarks.attention import ModelSpec, forward_macs
    from benchmarks.throughput import step_flops

    spec = ModelSpec("tiny", 96, 3, 3, [32, 96, 96], [8, 16, 16], 4.0)
    levels = ["scan", "scan", "study"]
    full = step_flops(spec, levels, [3, 3])
    assert step_flops(spec, levels, [1, 3]) < full
    patch = forward_macs(spec, [], 3)  # the patch embedding's backward is once its forward
    assert full == pytest.approx(2 * 2 * (3 * (forward_macs(spec, levels, 3) - patch) + 2 * patch))


def test_transport_benchmark_halves_the_bytes_and_measures_the_weights_against_fp32(mini_consortium, tmp_path):
    out = tmp_path / "transport.json"
    proc = run("transport.py", "--data", str(mini_consortium), "--preset", "", "--quick", "--json", str(out), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = {r["transport"]: r for r in json.loads(out.read_text())["rows"]}
    ref = rows.pop(next(iter(rows)))
    assert ref["ratio"] == 1.0 and ref["weight_error"] == 0.0 and ref["max_abs_weight_diff"] == 0.0
    assert rows and all(r["ratio"] == 0.5 for r in rows.values()), rows  # 16-bit values, the same arrays
    assert all(r["serialised"] > r["bytes"] for r in rows.values())  # plus an npy header per array
    assert all(0.0 < r["weight_error"] < 0.1 and r["rejected"] == 0 for r in rows.values()), rows


def test_token_probe_features_follow_the_towers_token_order():
    """A bright block in one patch: its token is the one whose lesion share is 1, whose voxels and
    upper quantiles are the brightest, and whose patch embedding the tower computes from it."""
    import torch

    from benchmarks.token_probe import patch_quantiles, patch_shares, patch_voxels, stage_tokens
    from hlip_fed.config import load_config
    from hlip_fed.model import create_model

    cfg = load_config(overrides=["model.vision.img_size=[16,32,32]"])
    visual = create_model(cfg.model, seed=0).visual
    patch = visual.cfg.patch_size  # 8 x 16 x 16: a grid of 2 x 2 x 2 tokens
    x = torch.zeros(1, 16, 32, 32)
    x[0, 8:16, 0:16, 16:32] = 1.0  # depth slab 1, row 0, column 1: token 1 * 4 + 0 * 2 + 1 = 5
    shares = patch_shares(x[0].numpy() > 0.5, patch)
    assert shares.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    assert patch_voxels(x, patch).mean(1).argmax() == 5 and patch_quantiles(x, patch)[:, -1].argmax() == 5
    visual.eval()
    tokens = stage_tokens(visual, x[None])
    assert set(tokens) == {"voxels", "voxel quantiles", "embedding", "block 1", "block 2", "block 3"}
    assert all(v.shape[:2] == (1, 8) for v in tokens.values())
    plain = visual.embed(torch.zeros(1, 1, 1, 16, 32, 32), torch.ones(1, 1, dtype=torch.bool))[0, 0].reshape(8, -1)
    moved = (torch.from_numpy(tokens["embedding"][0]) - plain.detach()).abs().sum(1)
    assert moved.argmax() == 5 and moved[[0, 1, 2, 3, 4, 6, 7]].max() < 1e-5


def test_token_probe_writes_each_stage(five_sites, tmp_path):
    out = tmp_path / "token-probe.json"
    proc = run("token_probe.py", str(five_sites), "--config", "", "--steps", "1", "--lesion-share", "0.01",
               "--overrides", "model.vision.img_size=[16,32,32] train.batch_size=2", "--json", str(out), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    data = json.loads(out.read_text())
    assert [r["stage"] for r in data["stages"]] == ["voxels", "voxel quantiles", "embedding", "block 1", "block 2",
                                                     "block 3"]
    assert data["head"] and "the tower's own head" in proc.stdout and "| stage |" in proc.stdout
    assert sum(data["lesion_tokens"].values()) > 0
