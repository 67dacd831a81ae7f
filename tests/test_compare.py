"""The comparison harness end to end on a small consortium: every method, one seed."""

import json
import shlex

from conftest import FAST_RUN
from simulations.compare import main as compare_main


def test_compare_writes_every_method_with_finite_metrics(mini_consortium, tmp_path):
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
        scored = [k for k in block if k.startswith("zeroshot_auc_") and k[13:] != "mean" and "_" not in k[13:]]
        assert scored and all(0.0 <= block[k] <= 1.0 for k in scored), block  # per finding, not only the mean
        lo, hi = block["r5_ci95"]
        assert lo <= block["r5"] <= hi
    assert res["local_worst"]["site"] in sites
    assert (out / "results.md").read_text().startswith("| method")
    assert "| AUC " in (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 1000
