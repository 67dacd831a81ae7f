"""The model card written beside a saved HLIP model: where it came from, what it is for, what it uses.

A model folder travels without its run folder (to another hospital, into a paper's supplement), so
the folder itself must say how it was made: rounds, sites and their example counts, digests of the
data and config, the code version; what it may and may not be used for; and the licences of what
it builds on. ``MODEL_CARD.md`` is for people, ``model_card.json`` holds the same facts for
tools. :func:`provenance_from_run` collects the facts a federated run folder already holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

from hlip_fed import __version__
from hlip_fed.config import ModelConfig, config_hash, section_from_yaml
from hlip_fed.outputs.report import read_rounds

MINILM_IDS = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")

HLIP_REFERENCE = ("Zhao et al., HLIP: Towards Scalable Language-Image Pre-training for 3D Medical Imaging, "
                  "arXiv:2505.21862 (2025)")
MNI_NOTICE = ("MNI152 2009a symmetric template (via nilearn): Copyright (C) 1993-2009 Louis Collins, "
              "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University. "
              "Distributed under a permissive licence that allows use, copying and modification with the "
              "copyright notice kept; check the licence text shipped with the template before redistributing "
              "derived data.")


def code_version() -> str:
    """The package version, plus the git commit (and ``-dirty``) when run from a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5)
        if rev.returncode == 0 and rev.stdout.strip():
            return f"{__version__}+git.{rev.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def tree_digest(folder: str | os.PathLike) -> str | None:
    """Digest of a data folder's file names and sizes (not contents: hashing gigabytes of scans for
    a card is not worth it; a renamed, added, removed or resized file changes it)."""
    root = Path(folder)
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            h.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def text_licence(name: str) -> str:
    if name in MINILM_IDS or name.endswith("all-MiniLM-L6-v2"):
        return "sentence-transformers/all-MiniLM-L6-v2: Apache-2.0"
    return f"{name}: see the model's own licence"


def provenance_from_run(run_dir: str | os.PathLike, cfg=None, data_root: str | os.PathLike | None = None,
                        site_names: list[str] | None = None) -> dict:
    """Rounds, per-site example counts (summed over rounds), strategy and digests from a run folder.

    Sites are keyed as the server saw them (node ids) unless ``site_names`` maps them in order.
    """

    rounds = read_rounds(run_dir)
    sites: dict[str, float] = {}
    for r in rounds:
        for node, m in (r.train_sites or {}).items():
            sites[node] = sites.get(node, 0.0) + float(m.get("num-examples", 0.0))
    if site_names and len(site_names) == len(sites):
        sites = dict(zip(site_names, sites.values()))
    prov: dict = {
        "rounds": len(rounds),
        "sites": {k: int(v) for k, v in sites.items()},
        "final_metrics": (rounds[-1].heldout if rounds else None) or {},
        "run_dir": Path(run_dir).name,
    }
    if cfg is not None:
        prov.update(config_hash=config_hash(cfg), strategy=cfg.federation.strategy,
                    text_model=cfg.model.text.name, preset=cfg.model.preset)
        if cfg.federation.init:
            prov["initial_weights"] = initial_weights(cfg.federation.init)
        if cfg.federation.site_local:
            prov["site_local"] = list(cfg.federation.site_local)
    if data_root is not None:
        prov["data_hash"] = tree_digest(data_root)
        if (Path(data_root) / "consortium.json").is_file():
            prov["data"] = "synthetic phantom consortium (hlip-fed synth)"
    return prov


def initial_weights(folder: str | os.PathLike) -> str:
    """Where a run that starts from a saved model folder got its weights (the folder's own card)."""
    try:
        before = json.loads((Path(folder) / "model_card.json").read_text()).get("initial_weights")
    except (OSError, ValueError):
        before = None
    return f"the model in {Path(folder).name}" + (f", itself from {before}" if before else "")


def departures_from_hlip(model_cfg) -> list[str]:
    """The ways a model's config departs from HLIP's published architecture (what learns on a CPU
    budget may not be what the paper trained)."""
    out = []
    if model_cfg.vision.pool != "token":
        out.append(f"study embedding: {model_cfg.vision.pool} pooling of the final patch tokens, not HLIP's CLS token")
    if model_cfg.vision.stem == "conv":
        out.append("patch embedding: a convolutional stem, not HLIP's single strided convolution")
    if model_cfg.vision.stem == "patch_quantiles":
        out.append("patch embedding: HLIP's strided convolution plus a linear map of each patch's intensity quantiles")
    if model_cfg.vision.stem == "patch_mirror":
        out.append("patch embedding: HLIP's strided convolution plus a linear map of each patch of the scan's "
                   "left-right difference")
    if model_cfg.text.proj != "linear":
        out.append("text side: no projection; the joint space is the locked text encoder's own")
    if model_cfg.text.sections != "all":
        out.append("reports: only the findings and impression sections are read")
    if model_cfg.loss.name == "masked":
        out.append("objective: masked image modelling of the scans alone, no report: a tower for a contrastive run "
                   "to start from; its zero-shot figures say nothing")
    return out


def _fmt_metrics(metrics: dict) -> list[str]:
    keys = [k for k in ("auc-mean", "bacc-mean", "r1", "r5", "r10") if k in metrics]
    return [f"| {k} | {metrics[k]:.3f} |" for k in keys]


def write_model_card(model_dir: str | os.PathLike, provenance: dict) -> Path:
    """Write ``MODEL_CARD.md`` and ``model_card.json`` into ``model_dir``; returns the markdown path.

    ``provenance`` keys (all optional): ``rounds``, ``sites`` (name -> examples), ``data_hash``,
    ``config_hash``, ``strategy``, ``text_model``, ``initial_weights`` (where training started;
    default: a random initialisation), ``data`` (what it was trained on; default:
    synthetic phantoms), ``final_metrics``, ``intended_use``, ``notes``, ``site_local`` (the
    parameter kinds that stayed at the sites).
    """
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_model, departures = provenance.get("text_model"), []
    if (out / "config.yaml").is_file():
        try:
            model_cfg = section_from_yaml(ModelConfig, (out / "config.yaml").read_text())
            text_model, departures = text_model or model_cfg.text.name, departures_from_hlip(model_cfg)
        except Exception:  # noqa: BLE001 - a card must still be written for an odd config
            pass
    text_model = text_model or "sentence-transformers/all-MiniLM-L6-v2"
    data = provenance.get("data") or "synthetic phantoms (hlip-fed synth); no patient data"
    synthetic = "synthetic" in data.lower() or "phantom" in data.lower()
    card = {
        "model": "HLIP (hierarchical 3D vision transformer + text tower, CLIP-style)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code_version": provenance.get("code_version") or code_version(),
        "training": {k: provenance.get(k) for k in ("rounds", "strategy", "sites", "data_hash", "config_hash")},
        "initial_weights": provenance.get("initial_weights") or "random initialisation",
        "data": data,
        "text_model": text_model,
        "final_metrics": provenance.get("final_metrics") or {},
        "departures_from_hlip": departures,
        "intended_use": provenance.get("intended_use") or (
            "Research and development of federated 3D language-image pre-training: zero-shot "
            "classification, retrieval and fine-tuning experiments."),
        "limitations": [
            "Not a medical device; not for diagnosis, triage or any clinical decision.",
            *(["Trained on synthetic phantom studies: it has not seen real patient anatomy, scanners or "
               "reports, and nothing it outputs on real scans is validated."] if synthetic else []),
            "Zero-shot probabilities are not calibrated; fit a temperature on labelled data "
            "(hlip-fed predict --labels-file) before reading them as probabilities.",
            "Performance depends on the sites' case mix, modalities and report language; check it on "
            "each new site's data.",
            *([f"Site-local parameters ({', '.join(provenance['site_local'])}) never left the sites: this "
               "model holds their initial values; a site's own model is these weights with the site-local "
               "ones kept in its state folder."] if provenance.get("site_local") else []),
        ],
        "licences": {
            "hlip-fed": "Apache-2.0",
            "text model": text_licence(text_model),
            "anatomy template": MNI_NOTICE,
        },
        "references": [HLIP_REFERENCE],
        "notes": provenance.get("notes"),
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2, default=str))
    t = card["training"]
    lines = [
        "# Model card: HLIP (hlip-fed)", "",
        f"Created {card['created']} with hlip-fed {card['code_version']}.", "",
        "## Provenance", "",
        "| | |", "|---|---|",
        f"| initial weights | {card['initial_weights']} |",
        f"| rounds | {t.get('rounds') if t.get('rounds') is not None else 'n/a'} |",
        f"| strategy | {t.get('strategy') or 'n/a'} |",
        f"| data | {data} |",
        f"| data hash | {t.get('data_hash') or 'n/a'} |",
        f"| config hash | {t.get('config_hash') or 'n/a'} |",
        f"| text model | {text_model} |", "",
    ]
    if departures:
        lines += ["Where this model departs from HLIP's published architecture:", "",
                  *[f"- {d}" for d in departures], ""]
    if t.get("sites"):
        lines += ["Sites and the training examples they contributed (summed over rounds):", "",
                  "| site | examples |", "|---|---|", *[f"| {k} | {v} |" for k, v in t["sites"].items()], ""]
    if card["final_metrics"]:
        metrics = _fmt_metrics(card["final_metrics"])
        if metrics:
            lines += ["Held-out metrics after the last round:", "", "| metric | value |", "|---|---|", *metrics, ""]
    lines += ["## Intended use", "", card["intended_use"], "", "## Limitations", "",
              *[f"- {x}" for x in card["limitations"]], "", "## Licences", "",
              *[f"- **{k}**: {v}" for k, v in card["licences"].items()], "", "## References", "",
              *[f"- {x}" for x in card["references"]], ""]
    if card["notes"]:
        lines += ["## Notes", "", str(card["notes"]), ""]
    path = out / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path
