"""Read a consortium's ground truth and prompts (the evaluation side; training never calls this).

``load_truth(dir, "heldout")`` gives ``{study_id: {finding: 0/1}}`` for the public evaluation set;
``load_records`` the full records with attributes; ``load_prompts`` the zero-shot prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

from hlip_fed.errors import HlipError
from hlip_fed.synth.findings import FINDINGS


def load_consortium(consortium_dir: str | Path) -> dict:
    path = Path(consortium_dir) / "consortium.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise HlipError(f"{path}: not found; generate a consortium with `hlip-fed synth --out DIR`") from None
    except json.JSONDecodeError as exc:
        raise HlipError(f"{path}: invalid JSON ({exc.msg})") from None


def load_records(consortium_dir: str | Path, cohort: str = "heldout", split: str | None = None) -> list[dict]:
    """Truth records of a site (or ``"heldout"``), optionally of one split only."""
    path = Path(consortium_dir) / "truth" / f"{cohort}.jsonl"
    if not path.exists():
        raise HlipError(f"{path}: no truth file for cohort {cohort!r}")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if split is None or r["split"] == split]


def load_truth(consortium_dir: str | Path, cohort: str = "heldout", split: str | None = None) -> dict[str, dict[str, int]]:
    """``{study_id: {finding: 0|1}}`` for every study of ``cohort`` (in :data:`FINDINGS` order)."""
    return {r["study_id"]: {n: int(r["labels"][n]) for n in FINDINGS} for r in load_records(consortium_dir, cohort, split)}


def load_prompts(consortium_dir: str | Path) -> dict[str, dict[str, list[str]]]:
    """``{finding: {"positive": [...], "negative": [...]}}`` from ``prompts.json``."""
    path = Path(consortium_dir) / "prompts.json"
    if not path.exists():
        raise HlipError(f"{path}: not found")
    return json.loads(path.read_text())["prompts"]


def cohorts(consortium_dir: str | Path) -> list[str]:
    """Site names in consortium order (without the held-out set)."""
    return [s["name"] for s in load_consortium(consortium_dir)["sites"]]


def site_dir(consortium_dir: str | Path, site: str) -> Path:
    return Path(consortium_dir) / ("heldout" if site == "heldout" else f"sites/{site}")
