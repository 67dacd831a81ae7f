"""Plan and write a whole phantom consortium: sites, held-out set, truth, prompts, description.

Layout written under ``OUT``::

    OUT/consortium.json            sites, modality, format, case mix, sizes, seed, preset
    OUT/prompts.json               zero-shot prompts per finding (held-out wording)
    OUT/sites/<site>/{train,test}/<study_id>/{report.txt, scans}    one folder per hospital
    OUT/heldout/test/<study_id>/...                                 public evaluation set
    OUT/truth/<site>.jsonl, OUT/truth/heldout.jsonl                 labels and attributes
    OUT/truth/masks/<site>/<study_id>.nii.gz                        finding label maps

Site folders hold only what a hospital would have (images and reports), so handing
``OUT/sites/<site>`` to a federated client never leaks labels. Labels are assigned per site by
exact prevalence (a shuffled list with round(p * n) positives per finding, independent across
findings), so the case mix is what the site archetype says, not sampling noise. Every study is
rendered from its own seed, so the result does not depend on worker count or order.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hlip_fed.errors import HlipError
from hlip_fed.synth.anatomy import head_atlas
from hlip_fed.synth.findings import FINDING_TITLES, FINDINGS
from hlip_fed.synth.prompts import PROMPTS
from hlip_fed.synth.render import StudyPlan, render_study
from hlip_fed.synth.reports import STYLES
from hlip_fed.synth.sites import HELDOUT_PREVALENCE, HELDOUT_SCANNERS, Preset, preset, site_specs
from hlip_fed.synth.writer import write_masks, write_study

FORMAT = "hlip-fed-phantom/1"
HELDOUT = "heldout"
_HELDOUT_PROTOCOL = {"T1": 0.7, "T2": 0.7, "FLAIR": 0.7, "T1C": 0.4}


def _exact_labels(n: int, prevalence: dict[str, float], rng: np.random.Generator) -> list[dict[str, int]]:
    labels = [{name: 0 for name in FINDINGS} for _ in range(n)]
    for name in FINDINGS:
        k = int(round(prevalence.get(name, 0.0) * n))
        for i in rng.permutation(n)[:k]:
            labels[int(i)][name] = 1
    return labels


def plan_site(spec: dict, index: int, n: int, test_fraction: float, seed: int) -> list[StudyPlan]:
    """Study plans of one hospital: ids, splits, labels and the site's scanner and style."""
    rng = np.random.default_rng([seed, index, 0])
    labels = _exact_labels(n, spec["prevalence"], rng)
    n_test = max(1, int(round(n * test_fraction)))
    test = set(int(i) for i in rng.permutation(n)[:n_test])
    plans = []
    for i in range(n):
        plans.append(StudyPlan(
            cohort=spec["name"], study_id=f"{spec['prefix']}{i + 1:05d}", split="test" if i in test else "train",
            seed=(seed, index + 1, i + 1), labels=labels[i], modality=spec["modality"], fmt=spec["format"],
            scanner=spec["scanner"], protocol=spec["sequences"], second_recon=spec.get("second_recon", 0.0),
            shuffle=spec["shuffle"], naming=spec["naming"], style=spec["style"],
        ))
    return plans


def plan_heldout(n: int, seed: int) -> list[StudyPlan]:
    """The public evaluation set: balanced findings, CT and MRI, its own scanners, mixed styles."""
    rng = np.random.default_rng([seed, 10_000, 0])
    labels = _exact_labels(n, {name: HELDOUT_PREVALENCE for name in FINDINGS}, rng)
    plans = []
    styles = sorted(STYLES)
    for i in range(n):
        modality = "CT" if rng.random() < 0.35 else "MR"
        plans.append(StudyPlan(
            cohort=HELDOUT, study_id=f"PUB{i + 1:05d}", split="test", seed=(seed, 10_000, i + 1),
            labels=labels[i], modality=modality, fmt="nifti", scanner=HELDOUT_SCANNERS[modality],
            protocol=_HELDOUT_PROTOCOL, second_recon=0.0, shuffle=True, naming="series",
            style=styles[int(rng.integers(len(styles)))],
        ))
    return plans


def plan_consortium(p: Preset, seed: int) -> tuple[list[dict], dict[str, list[StudyPlan]]]:
    """Site specs and the study plans of every cohort (sites in order, then the held-out set)."""
    specs = site_specs(p.sites, seed)
    cohorts: dict[str, list[StudyPlan]] = {}
    for i, spec in enumerate(specs):
        n = max(2, int(round(p.studies * spec["size"])))
        cohorts[spec["name"]] = plan_site(spec, i, n, p.test_fraction, seed)
    if p.heldout:
        cohorts[HELDOUT] = plan_heldout(p.heldout, seed)
    return specs, cohorts


def study_dir(out: Path, plan: StudyPlan) -> Path:
    if plan.cohort == HELDOUT:
        return out / HELDOUT / plan.split / plan.study_id
    return out / "sites" / plan.cohort / plan.split / plan.study_id


def generate_study(plan: StudyPlan, out: Path) -> dict:
    """Render and write one study; return its truth record."""
    study = render_study(plan)
    scans = write_study(study, study_dir(out, plan), plan.seed[0])
    write_masks(study, out / "truth" / "masks" / plan.cohort / f"{plan.study_id}.nii.gz")
    return {
        "study_id": plan.study_id, "split": plan.split, "modality": plan.modality,
        "labels": study.labels, "findings": [f.to_json() for f in study.findings],
        "normal": not any(study.labels.values()), "scans": scans,
        "ventricle_mm": round(study.ventricle_mm, 2), "sulcal_mm": round(study.sulcal_mm, 2),
        "style": plan.style,
    }


def _worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def build_consortium(out: Path, preset_name: str = "demo", sites: int | None = None, studies: int | None = None,
                     seed: int = 0, heldout: int | None = None, workers: int = 1, overwrite: bool = False) -> dict:
    """Generate a consortium into ``out`` and return its description (``consortium.json``)."""
    p = preset(preset_name, sites, studies, heldout)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite and not (out / "consortium.json").exists():
            raise HlipError(f"{out}: folder exists and is not a phantom consortium; choose an empty folder")
        for sub in ("sites", HELDOUT, "truth"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    specs, cohorts = plan_consortium(p, seed)
    plans = [plan for cohort in cohorts.values() for plan in cohort]
    head_atlas()  # built once here, inherited by forked workers
    records: dict[str, list[dict]] = {name: [] for name in cohorts}
    with tqdm(total=len(plans), desc="synth", unit="study", leave=False, disable=None) as bar:
        if workers > 1:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
                for plan, rec in zip(plans, pool.map(generate_study, plans, [out] * len(plans), chunksize=4)):
                    records[plan.cohort].append(rec)
                    bar.update()
        else:
            for plan in plans:
                records[plan.cohort].append(generate_study(plan, out))
                bar.update()
    truth_dir = out / "truth"
    truth_dir.mkdir(exist_ok=True)
    for name, recs in records.items():
        with open(truth_dir / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for rec in recs:
                fh.write(json.dumps(rec, sort_keys=True) + "\n")
    for spec in specs:
        site_json = {"name": spec["name"], "institution": f"{spec['name'].replace('-', ' ').title()} (phantom {spec['kind']})"}
        (out / "sites" / spec["name"] / "site.json").write_text(json.dumps(site_json, indent=1) + "\n")
    (out / "prompts.json").write_text(json.dumps({"findings": list(FINDINGS), "prompts": PROMPTS}, indent=1) + "\n")
    desc = describe(p, seed, specs, records)
    (out / "consortium.json").write_text(json.dumps(desc, indent=1) + "\n")
    return desc


def describe(p: Preset, seed: int, specs: list[dict], records: dict[str, list[dict]]) -> dict:
    def counts(recs: list[dict]) -> dict:
        return {
            "studies": len(recs),
            "train": sum(r["split"] == "train" for r in recs),
            "test": sum(r["split"] == "test" for r in recs),
            "scans": sum(len(r["scans"]) for r in recs),
            "positives": {n: sum(r["labels"][n] for r in recs) for n in FINDINGS},
            "normal": sum(r["normal"] for r in recs),
        }

    sites = []
    for spec in specs:
        sites.append({
            "name": spec["name"], "kind": spec["kind"], "modality": spec["modality"], "format": spec["format"],
            "path": f"sites/{spec['name']}", "case_mix": spec["prevalence"], "protocol": spec["sequences"],
            "scanner": spec["scanner"], "report_style": spec["style"], **counts(records[spec["name"]]),
        })
    return {
        "format": FORMAT, "seed": seed, "preset": p.name, "findings": list(FINDINGS),
        "finding_titles": FINDING_TITLES, "anatomy": "MNI152 2009a symmetric T1/GM/WM templates (bundled with nilearn)",
        "sites": sites,
        "heldout": {"path": f"{HELDOUT}", **counts(records.get(HELDOUT, [])), "prevalence": HELDOUT_PREVALENCE,
                    "scanners": HELDOUT_SCANNERS},
        "truth": "truth/<cohort>.jsonl (labels, attributes); truth/masks/<cohort>/<study_id>.nii.gz (bit i = findings[i])",
        "prompts": "prompts.json",
    }
