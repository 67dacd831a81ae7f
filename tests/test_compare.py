"""The comparison harness end to end on a small consortium: every method, one seed."""

import json
import shlex

import pytest

from conftest import FAST_RUN, write_mini_consortium
from simulations.compare import main as compare_main, markdown, summarise

FAMILIES = ("zeroshot_auc_", "probe_auc_", "prompt_ceiling_")


def test_compare_writes_every_method_with_finite_metrics(tmp_path, capsys):
    # 15 held-out studies: five per kind, enough for a 5-fold probe of every finding
    mini_consortium = write_mini_consortium(tmp_path / "consortium", heldout=15)
    out = tmp_path / "cmp"
    overrides = " ".join(shlex.quote(o) for o in FAST_RUN)
    assert compare_main(["--data", str(mini_consortium), "--out", str(out), "--config", "",
                         "--overrides", overrides, "--seeds", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    sites = ["site0", "site1", "site2"]
    assert res["sites"] == sites and res["budget_steps"] == 2 * 2 * 3
    blocks = [res["pooled"], res["fedavg"], res["fedprox"], *res["local"].values(), *res["loso"].values()]
    assert set(res["local"]) == set(res["loso"]) == set(sites)
    for block in blocks:
        for key in ("zeroshot_auc_mean", "balanced_acc_mean", "r1", "r5", "r10"):
            assert 0.0 <= block[key] <= 1.0, (key, block)
        lo, hi = block["r5_ci95"]
        assert lo <= block["r5"] <= hi
    for block in blocks[:-3]:  # held-out blocks (loso scores a site's 2 test studies: no probe there)
        for finding in ("lesion-left", "lesion-right"):  # per finding, not only the mean
            for family in FAMILIES:
                assert 0.0 <= block[family + finding] <= 1.0, (family, finding, block)
            lo, hi = block[f"zeroshot_auc_{finding}_ci95"]
            assert 0.0 <= lo <= hi <= 1.0
            # every toy study is MR: scored within the MR studies, each figure is the whole set's
            for family in ("zeroshot_auc_", "probe_auc_"):
                assert block[family.replace("auc_", "auc_mr_") + finding] == block[family + finding]
            assert block[f"zeroshot_auc_mr_{finding}_ci95"] == [lo, hi]
            assert not any(k.startswith("zeroshot_auc_ct_") for k in block)
    assert res["local_worst"]["site"] in sites
    assert (out / "results.md").read_text().startswith("| method")
    md = (out / "results.md").read_text()
    worst = res["local_worst"]["site"]
    assert "local_worst" not in md and md.count(f"| local ({worst}, worst) |") == md.count(f"| local (site")  // 3
    assert "Zero-shot AUC per finding" in md and "Image-embedding probe AUC per finding" in md and "Prompt ceiling" in md
    assert "Zero-shot AUC on the MR studies per finding" in md and "on the CT studies" not in md
    assert "| method | lesion-left | lesion-right |" in md and "mr_lesion" not in md  # one finding, one column
    # The demo's terminal shows the headline and zero-shot tables only: the same lines, fewer tables.
    short = markdown(summarise(res["per_seed"]), families=("zeroshot_auc_",))
    assert md.startswith(short.rstrip("\n")) and "probe AUC per finding" not in short
    # Each method's figures and wall time are kept as it finishes; --resume does not redo them.
    progress = json.loads((out / "seed-0" / "progress.json").read_text())
    assert {"pooled", "fedavg", "fedprox", "local-site0", "loso-site2"} <= set(progress["seconds"])
    # Equal compute: every method took the budget's optimiser steps (a federation: its sites'
    # steps summed over rounds; without one site, that site's share is missing).
    taken = progress["steps"]
    assert {taken[m] for m in ("pooled", "fedavg", "fedprox", "local-site0", "local-site1", "local-site2")} \
        == {res["budget_steps"]}
    assert taken["loso-site2"] == res["budget_steps"] * 2 // 3
    assert compare_main(["--data", str(mini_consortium), "--out", str(out), "--config", "", "--overrides", overrides,
                         "--methods", "pooled,fedavg", "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert set(again) - {"per_seed"} >= {"pooled", "fedavg"} and "local" not in again
    assert again["pooled"]["zeroshot_auc_mean"] == res["pooled"]["zeroshot_auc_mean"]
    # Resuming under other settings would mix two experiments' figures in one table: refused, one line.
    changed = overrides + " train.lr=0.123"
    assert compare_main(["--data", str(mini_consortium), "--out", str(out), "--config", "", "--overrides", changed,
                         "--methods", "pooled,fedavg", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "seed-0/progress.json" in err and "\n" not in err, err
    assert json.loads((out / "results.json").read_text()) == again
    # FedBN at the same budget, scored as the mean of the sites' own models (global + own norms).
    assert compare_main(["--data", str(mini_consortium), "--out", str(out), "--config", "", "--overrides", overrides,
                         "--methods", "fedbn,fedavg", "--resume"]) == 0
    fedbn = json.loads((out / "results.json").read_text())["fedbn"]
    assert 0.0 <= fedbn["zeroshot_auc_mean"] <= 1.0 and set(fedbn) == set(res["fedavg"])
    assert json.loads((out / "seed-0" / "progress.json").read_text())["steps"]["fedbn"] == res["budget_steps"]
    for site in sites:  # every site kept its own norms, which the scoring read
        assert (out / "seed-0" / "fedbn" / "sites" / site / "site-local-round-0002.safetensors").is_file()
    # The tables are the JSON's figures: the pooled row's headline cells, as written.
    pooled = next(line for line in md.splitlines() if line.startswith("| pooled |")).split(" | ")
    assert pooled[1] == f"{res['pooled']['zeroshot_auc_mean']:.3f}" and pooled[4] == f"{res['pooled']['r5']:.3f}"
    import matplotlib.image

    assert min(matplotlib.image.imread(out / "results.png").shape[:2]) > 200  # a real figure


def test_pooled_site_batches_draw_each_batch_from_one_site(mini_consortium):
    from torch.utils.data import ConcatDataset

    from hlip_fed.config import load_config
    from simulations.compare import Consortium

    cfg = load_config("tiny", overrides=FAST_RUN + ["train.site_batches=true"])
    cons = Consortium(mini_consortium, cfg)
    pooled = ConcatDataset(list(cons.train.values()))
    batches = [ids for _, _, _, ids in cons.loader(pooled, shuffle=True, seed=0)]
    assert len(batches) == 6  # three sites of four studies, batches of two
    assert all(len({i.split("-")[0] for i in ids}) == 1 for ids in batches), batches
    assert len({ids[0].split("-")[0] for ids in batches}) == 3


def test_a_choice_of_sites_keeps_them_and_the_heldout_studies_of_their_modality(tmp_path):
    from hlip_fed.config import load_config
    from hlip_fed.errors import HlipError
    from simulations.compare import Consortium

    root = write_mini_consortium(tmp_path / "c", heldout=6)
    for scan in [*(root / "sites" / "site1").rglob("scan*.json"), *(root / "heldout" / "test" / "h0").glob("*.json"),
                 *(root / "heldout" / "test" / "h3").glob("*.json")]:
        scan.write_text(json.dumps({"modality": "CT"}))  # site1 and two held-out studies are CT
    cfg = load_config("tiny", overrides=FAST_RUN)
    every = Consortium(root, cfg)
    assert len(every.heldout) == 6 and every.data_root(tmp_path / "out") == root
    ct = Consortium(root, cfg, sites=["site1"])
    assert list(ct.train) == list(ct.test) == ["site1"]
    assert sorted(e["study_id"] for e in ct.heldout.entries) == ["h0", "h3"]
    mr = Consortium(root, cfg, sites=["site2", "site0"])
    assert list(mr.train) == ["site0", "site2"] and len(mr.heldout) == 4
    view = mr.data_root(tmp_path / "out")
    assert sorted(p.name for p in (view / "sites").iterdir()) == ["site0", "site2"]
    assert (view / "heldout" / "test" / "h1" / "report.txt").is_file() and (view / "prompts.json").is_file()
    with pytest.raises(HlipError, match="no site nowhere") as err:
        Consortium(root, cfg, sites=["site0", "nowhere"])
    assert "\n" not in str(err.value)
    assert compare_main(["--data", str(root), "--out", str(tmp_path / "cmp"), "--config", "", "--sites", "nowhere",
                         "--methods", "pooled"]) == 2
    assert sorted(p.name for p in (root / "sites").iterdir()) == ["site0", "site1", "site2"]  # the source untouched


def test_a_choice_of_sequences_keeps_those_scans_and_the_studies_that_hold_one(tmp_path):
    from hlip_fed.config import load_config
    from hlip_fed.errors import HlipError
    from simulations.compare import Consortium

    root = write_mini_consortium(tmp_path / "c", heldout=6)
    for sidecar in sorted(root.rglob("scan0.json"))[::2]:
        sidecar.write_text(json.dumps({"modality": "MR", "sequence": "FLAIR"}))
    cfg = load_config("tiny", overrides=FAST_RUN)
    every = Consortium(root, cfg)
    flair = Consortium(root, cfg, sequences=["FLAIR"])
    for name in every.train:
        for split in ("train", "test"):
            kept, whole = getattr(flair, split)[name].entries, getattr(every, split)[name].entries
            assert {s["sequence"] for e in kept for s in e["scans"]} <= {"FLAIR"}
            assert [e["study_id"] for e in kept] == [e["study_id"] for e in whole
                                                     if any(s["sequence"] == "FLAIR" for s in e["scans"])]
    assert 0 < len(flair.heldout) < len(every.heldout)
    assert sum(len(d) for d in flair.train.values()) < sum(len(d) for d in every.train.values())
    with pytest.raises(HlipError, match="no DWI scan") as err:
        Consortium(root, cfg, sequences=["DWI"])
    assert "\n" not in str(err.value) and "site0" in str(err.value)
    assert {s["sequence"] for e in Consortium(root, cfg).train["site0"].entries for s in e["scans"]} == {"FLAIR", "T1"}


def test_a_scan_without_a_sequence_is_chosen_by_its_modality():
    """A CT series has no sequence: ``CT`` among the sequences keeps it, beside the MR ones named."""
    from types import SimpleNamespace

    from simulations.compare import keep_sequences

    ct = {"path": "ct", "modality": "CT", "sequence": None}
    flair, t1 = ({"path": s, "modality": "MR", "sequence": s} for s in ("FLAIR", "T1"))
    dataset = SimpleNamespace(site="site", entries=[{"study_id": "a", "scans": [ct]}, {"study_id": "b", "scans": [t1]},
                                                    {"study_id": "c", "scans": [t1, flair]}])
    keep_sequences(dataset, ["FLAIR", "CT"])
    assert dataset.entries == [{"study_id": "a", "scans": [ct]}, {"study_id": "c", "scans": [flair]}]


def test_a_later_seed_alone_and_a_masked_pretraining_stage(tmp_path):
    """``--first-seed`` runs only the seeds asked for; a ``masked`` run trains the tower on the scans,
    saves it, and a contrastive comparison starts from it (``--init``)."""
    mini_consortium = write_mini_consortium(tmp_path / "consortium", heldout=15)
    overrides = " ".join(shlex.quote(o) for o in FAST_RUN)
    stage = tmp_path / "masked"
    assert compare_main(["--data", str(mini_consortium), "--out", str(stage), "--config", "", "--methods", "pooled",
                         "--overrides", overrides + " model.loss.name=masked", "--seeds", "1",
                         "--first-seed", "1"]) == 0
    assert not (stage / "seed-0").exists() and json.loads((stage / "results.json").read_text())["first_seed"] == 1
    model = stage / "seed-1" / "pooled" / "model"
    assert "name: masked" in (model / "config.yaml").read_text()
    out = tmp_path / "clip"
    assert compare_main(["--data", str(mini_consortium), "--out", str(out), "--config", "", "--methods", "pooled",
                         "--overrides", overrides, "--init", str(model), "--first-seed", "1"]) == 0
    assert 0.0 <= json.loads((out / "results.json").read_text())["pooled"]["zeroshot_auc_mean"] <= 1.0
