"""The hospitals of the phantom consortium and the generation presets.

Sites differ the way real hospitals do: modality (CT or MRI), file format (DICOM series or NIfTI),
scanner (in-plane resolution, slice thickness, stored orientation, intensity scale, bias field,
noise, tissue contrast), MRI protocol (which sequences, in which order), case mix (a stroke
centre sees infarcts and bleeds, a cancer centre masses, a memory clinic atrophy), size, and
report style. ``--sites K`` takes the first K archetypes below; beyond six, archetypes repeat as
further hospitals of the same kind with their own scanner settings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from hlip_fed.errors import HlipError

PRESETS = {
    # Small enough for `make demo` and the tests' budget; big enough for every finding to occur.
    "demo": {"sites": 4, "studies": 30, "heldout": 40, "test_fraction": 0.25},
    # The benchmark: >= 30 held-out positives per finding (heldout * 0.3 each), bigger sites.
    "benchmark": {"sites": 6, "studies": 150, "heldout": 160, "test_fraction": 0.2},
}

# Held-out ("public") evaluation set: balanced case mix, CT and MRI from a scanner of its own.
HELDOUT_PREVALENCE = 0.3

_ARCHETYPES: list[dict] = [
    {
        "name": "northgate-stroke", "kind": "stroke centre", "modality": "CT", "format": "dicom",
        "prevalence": {"mass": 0.06, "haemorrhage": 0.30, "infarct": 0.45, "atrophy": 0.35},
        "size": 1.3, "sequences": {"CT": 1.0}, "second_recon": 0.3, "shuffle": False,
        "naming": "dicom", "style": "terse", "prefix": "NGS",
        "scanner": {"inplane_mm": 2.3, "matrix": 96, "slice_mm": 5.0, "orientation": "LPS",
                    "noise": 3.5, "offset": 0.0},
    },
    {
        "name": "riverside-oncology", "kind": "cancer centre", "modality": "MR", "format": "nifti",
        "prevalence": {"mass": 0.60, "haemorrhage": 0.10, "infarct": 0.05, "atrophy": 0.10},
        "size": 1.0, "sequences": {"T1": 0.85, "T2": 0.8, "FLAIR": 0.9, "T1C": 0.95}, "shuffle": False,
        "naming": "protocol", "style": "narrative", "prefix": "RVO",
        "scanner": {"inplane_mm": 2.0, "matrix": 112, "slice_mm": 4.0, "orientation": "LPS",
                    "scale": 1200.0, "bias": 0.12, "noise": 0.03, "tweak": {"gm": -0.04, "wm": 0.03}},
    },
    {
        "name": "st-mary-general", "kind": "general hospital", "modality": "MR", "format": "nifti",
        "prevalence": {"mass": 0.15, "haemorrhage": 0.12, "infarct": 0.20, "atrophy": 0.20},
        "size": 1.2, "sequences": {"T1": 0.7, "T2": 0.8, "FLAIR": 0.7, "T1C": 0.3}, "shuffle": True,
        "naming": "series", "style": "sections", "prefix": "SMG",
        "scanner": {"inplane_mm": 2.4, "matrix": 96, "slice_mm": 5.0, "orientation": "RAS",
                    "scale": 600.0, "bias": 0.28, "noise": 0.05, "tweak": {"gm": 0.04, "csf": -0.05}},
    },
    {
        "name": "lakeside-memory", "kind": "memory clinic", "modality": "MR", "format": "nifti",
        "prevalence": {"mass": 0.03, "haemorrhage": 0.05, "infarct": 0.15, "atrophy": 0.60},
        "size": 0.6, "sequences": {"T1": 0.95, "T2": 0.4, "FLAIR": 0.8, "T1C": 0.05}, "shuffle": False,
        "naming": "protocol", "style": "structured", "prefix": "LKM",
        "scanner": {"inplane_mm": 2.2, "matrix": 100, "slice_mm": 3.5, "orientation": "LAS",
                    "scale": 2500.0, "bias": 0.18, "noise": 0.04, "tweak": {"wm": 0.05}},
    },
    {
        "name": "harbour-trauma", "kind": "trauma and emergency centre", "modality": "CT", "format": "nifti",
        "prevalence": {"mass": 0.08, "haemorrhage": 0.45, "infarct": 0.15, "atrophy": 0.25},
        "size": 0.9, "sequences": {"CT": 1.0}, "second_recon": 0.25, "shuffle": False,
        "naming": "series", "style": "narrative", "prefix": "HBT",
        "scanner": {"inplane_mm": 2.0, "matrix": 112, "slice_mm": 4.0, "orientation": "IPR",
                    "noise": 5.0, "offset": 3.0},
    },
    {
        "name": "valley-community", "kind": "community hospital", "modality": "MR", "format": "nifti",
        "prevalence": {"mass": 0.12, "haemorrhage": 0.08, "infarct": 0.15, "atrophy": 0.25},
        "size": 0.7, "sequences": {"T1": 0.5, "T2": 0.8, "FLAIR": 0.6, "T1C": 0.15}, "shuffle": True,
        "naming": "series", "style": "terse", "prefix": "VLC",
        "scanner": {"inplane_mm": 2.6, "matrix": 88, "slice_mm": 6.0, "orientation": "RPI",
                    "scale": 400.0, "bias": 0.35, "noise": 0.07, "tweak": {"gm": 0.06, "wm": -0.04}},
    },
]

HELDOUT_SCANNERS = {
    "CT": {"inplane_mm": 2.2, "matrix": 104, "slice_mm": 4.5, "orientation": "RAS", "noise": 4.0, "offset": 1.0},
    "MR": {"inplane_mm": 2.2, "matrix": 104, "slice_mm": 4.5, "orientation": "RAS", "scale": 1000.0,
           "bias": 0.2, "noise": 0.045, "tweak": {}},
}


@dataclass(frozen=True)
class Preset:
    name: str
    sites: int
    studies: int
    heldout: int
    test_fraction: float


def preset(name: str, sites: int | None = None, studies: int | None = None, heldout: int | None = None) -> Preset:
    """A generation preset, with command-line values taking precedence over its defaults."""
    if name not in PRESETS:
        raise HlipError(f"unknown synth preset {name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    out = Preset(name=name, sites=sites or p["sites"], studies=studies or p["studies"],
                 heldout=p["heldout"] if heldout is None else heldout, test_fraction=p["test_fraction"])
    if out.sites < 2:
        raise HlipError("a consortium needs at least 2 sites (one CT and one MRI)")
    if out.studies < 2:
        raise HlipError("each site needs at least 2 studies (one train, one test)")
    return out


def site_specs(k: int, seed: int) -> list[dict]:
    """The first ``k`` hospitals. Repeats of an archetype get their own name and scanner tweaks."""
    out = []
    for i in range(k):
        spec = copy.deepcopy(_ARCHETYPES[i % len(_ARCHETYPES)])
        round_ = i // len(_ARCHETYPES)
        if round_:
            rng = np.random.default_rng([seed, i])
            spec["name"] = f"{spec['name']}-{round_ + 1}"
            spec["prefix"] = f"{spec['prefix'][:2]}{round_ + 1}"
            sc = spec["scanner"]
            sc["inplane_mm"] = round(float(sc["inplane_mm"] * rng.uniform(0.9, 1.1)), 2)
            sc["noise"] = float(sc["noise"] * rng.uniform(0.8, 1.25))
            if "scale" in sc:
                sc["scale"] = float(sc["scale"] * rng.uniform(0.5, 2.0))
            spec["size"] = float(spec["size"] * rng.uniform(0.7, 1.3))
        out.append(spec)
    return out
