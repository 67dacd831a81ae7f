"""Tissue composition of a subject at arbitrary points: anatomy, atrophy and lesions.

Given template points ``q`` (from :class:`~hlip_fed.synth.anatomy.SubjectTransform`), this module
returns the fraction of each tissue class in every point. Findings act the way pathology does:

* a mass displaces the surrounding brain (volume-conserving radial push, hence ventricular
  compression and midline shift for large ones), is an irregular ellipsoid of enhancing tumour
  with an optional necrotic core, and is surrounded by vasogenic oedema that spreads mainly in
  white matter;
* an intraparenchymal haemorrhage is a haematoma with mild mass effect and a thin rim of
  perihaematomal oedema;
* an infarct turns the grey and white matter of part of an arterial territory into infarcted
  tissue (a cortical-subcortical wedge for MCA/ACA/PCA, a small deep lesion for lenticulostriate);
* atrophy enlarges the ventricles and widens the cortical sulci by turning parenchyma next to
  them into CSF (every subject gets a little of this, as ageing does; atrophy cases get more).

Contrast-specific intensities are applied later (:mod:`hlip_fed.synth.contrasts`), so one
composition serves every scan of a study and the truth masks come from the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hlip_fed.synth.anatomy import CHANNELS, TISSUES, HeadAtlas, sample_atlas
from hlip_fed.synth.findings import Finding

LESION_CLASSES = ("enhancing", "necrosis", "oedema", "blood", "infarct")
CLASSES = TISSUES + LESION_CLASSES

ATROPHY_MM = {  # (ventricular, sulcal) widening in mm by severity; normal ageing below "mild"
    "normal": ((0.0, 1.5), (0.0, 0.6)),
    "mild": ((2.5, 3.5), (1.0, 1.6)),
    "moderate": ((3.5, 5.0), (1.6, 2.2)),
    "severe": ((5.0, 7.0), (2.2, 3.0)),
}


@dataclass
class Composition:
    """Tissue fractions ``fractions[c, n]`` (c in :data:`CLASSES`) and per-finding truth masks.

    ``masks[name]`` is a soft mask in [0, 1] of the abnormal region of finding ``name`` (the lesion
    and its oedema; for atrophy the parenchyma turned into CSF); ``mirror[name]`` is the same
    region reflected to the other hemisphere (the contralateral reference region).
    """

    fractions: np.ndarray
    masks: dict[str, np.ndarray]
    mirror: dict[str, np.ndarray]
    parts: dict[str, np.ndarray]  # sub-regions: "mass_enhancing", "mass_core", "blood", ...

    def fraction(self, name: str) -> np.ndarray:
        return self.fractions[CLASSES.index(name)]


def _soft(x: np.ndarray, width: float) -> np.ndarray:
    """A partial-volume edge: 0 below -width/2, 1 above width/2, linear between."""
    return np.clip(x / width + 0.5, 0.0, 1.0)


def _rho(q: np.ndarray, f: Finding) -> np.ndarray:
    """Normalised radius of an irregular ellipsoid (1 on its surface) at points ``q``."""
    rng = np.random.default_rng(f.seed)
    rel = q - np.asarray(f.centre)
    local = rel @ np.asarray(f.axes).T / np.asarray(f.radii)
    r = np.linalg.norm(local, axis=1)
    u = local / np.maximum(r, 1e-6)[:, None]
    wobble = np.ones(len(q))
    for _ in range(3):
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        wobble += rng.uniform(0.04, 0.12) * np.cos(rng.uniform(2.0, 4.5) * (u @ v) * np.pi + rng.uniform(0, 2 * np.pi))
    return r / wobble


def _push(q: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """Where the tissue now at ``q`` came from when a lesion of ``radius`` grew at ``centre``.

    A sphere of volume (4/3)pi r^3 pushed in displaces tissue radially, conserving volume; the
    displacement fades beyond a few radii so the skull stays put.
    """
    rel = q - centre
    d = np.linalg.norm(rel, axis=1)
    src = np.cbrt(np.maximum(d**3 - radius**3, 0.0))
    fade = 1.0 / (1.0 + (d / (3.0 * radius)) ** 4)
    scale = 1.0 - (1.0 - src / np.maximum(d, 1e-6)) * fade
    return centre + rel * scale[:, None]


def _near(q: np.ndarray, centre: np.ndarray, reach: float) -> np.ndarray:
    """Indices of the points within a cube of half-side ``reach`` around ``centre``."""
    return np.flatnonzero(np.all(np.abs(q - centre) < reach, axis=1))


def _scatter(n: int, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    out[idx] = values
    return out


def _mirror(q: np.ndarray) -> np.ndarray:
    m = q.copy()
    m[:, 0] = -m[:, 0]
    return m


def atrophy_widths(finding: Finding | None, rng: np.random.Generator) -> tuple[float, float]:
    """Ventricular and sulcal widening (mm) for a subject, from its atrophy finding if any."""
    key = finding.severity if finding is not None and finding.severity else "normal"
    (v0, v1), (s0, s1) = ATROPHY_MM[key]
    return float(rng.uniform(v0, v1)), float(rng.uniform(s0, s1))


def compose(atlas: HeadAtlas, q: np.ndarray, findings: list[Finding], ventricle_mm: float,
            sulcal_mm: float) -> Composition:
    """Tissue fractions at template points ``q`` [N, 3] for a subject with ``findings``."""
    src = q
    for f in findings:
        if f.name == "mass":
            src = _push(src, np.asarray(f.centre), 0.8 * float(np.mean(f.radii)) + 0.3 * f.oedema_mm)
        elif f.name == "haemorrhage":
            src = _push(src, np.asarray(f.centre), 0.7 * float(np.mean(f.radii)))
    s = sample_atlas(atlas, src)
    frac = np.zeros((len(CLASSES), len(q)), dtype=np.float32)
    frac[: len(TISSUES)] = s[: len(TISSUES)]
    gm, wm, csf = (frac[CLASSES.index(n)] for n in ("gm", "wm", "csf"))
    dist_vent = s[CHANNELS.index("dist_vent")]
    dist_sulc = s[CHANNELS.index("dist_sulc")]

    masks: dict[str, np.ndarray] = {}
    mirror: dict[str, np.ndarray] = {}
    parts: dict[str, np.ndarray] = {}

    # Atrophy (and normal ageing): parenchyma next to ventricles and sulci becomes CSF.
    conv = np.maximum(_soft(ventricle_mm - dist_vent, 2.0) * (ventricle_mm > 0),
                      _soft(sulcal_mm - dist_sulc, 1.5) * (sulcal_mm > 0))
    parenchyma0 = gm + wm
    csf += conv * parenchyma0
    gm *= 1.0 - conv
    wm *= 1.0 - conv
    atrophy = next((f for f in findings if f.name == "atrophy"), None)
    if atrophy is not None:
        masks["atrophy"] = np.clip(conv * parenchyma0 * 1.6, 0.0, 1.0)
        parts["atrophy"] = masks["atrophy"]

    brain = np.clip(gm + wm + csf, 0.0, 1.0)
    n = len(q)
    for f in findings:
        if f.name == "atrophy":
            continue
        centre = np.asarray(f.centre)
        reach = float(np.max(f.radii)) * 1.4 + f.oedema_mm * 1.3 + 4.0
        idx = _near(q, centre, reach)
        midx = _near(q, centre * np.array([-1.0, 1.0, 1.0]), reach)
        ql, mq = q[idx], _mirror(q[midx])
        g, w, b = gm[idx], wm[idx], brain[idx]
        if f.name == "infarct":
            take = _soft(1.0 - _rho(ql, f), 0.25) * np.clip((g + w) * 1.3, 0.0, 1.0)
            frac[CLASSES.index("infarct"), idx] += take * (g + w)
            gm[idx] = g * (1.0 - take)
            wm[idx] = w * (1.0 - take)
            masks["infarct"] = _scatter(n, idx, take)
            mpar = gm[midx] + wm[midx] + frac[CLASSES.index("infarct"), midx]
            mirror["infarct"] = _scatter(n, midx, _soft(1.0 - _rho(mq, f), 0.25) * np.clip(mpar * 1.3, 0.0, 1.0))
            continue
        rho = _rho(ql, f)
        mean_r = float(np.mean(f.radii))
        edge = 1.5 / mean_r  # 1.5 mm partial-volume edge
        inside = _soft(1.0 - rho, edge)
        lesion = inside * b
        band = _soft(1.0 + f.oedema_mm / mean_r - rho, 4.0 / mean_r) * (1.0 - inside)
        share = w / np.maximum(g + w, 1e-6)
        oedema = band * (0.35 + 0.65 * share) * np.clip((g + w) * 1.3, 0.0, 1.0)
        g, w = g * (1.0 - lesion), w * (1.0 - lesion)
        csf[idx] *= 1.0 - lesion
        frac[CLASSES.index("oedema"), idx] += oedema * (g + w)
        gm[idx] = g * (1.0 - oedema)
        wm[idx] = w * (1.0 - oedema)
        mrho = _rho(mq, f)
        mb = brain[midx]
        if f.name == "mass":
            core = _soft(f.necrosis - rho, edge) * b if f.necrosis > 0 else np.zeros_like(rho)
            enhancing = np.clip(lesion - core, 0.0, 1.0)
            frac[CLASSES.index("necrosis"), idx] += core
            frac[CLASSES.index("enhancing"), idx] += enhancing
            parts["mass_enhancing"] = _scatter(n, idx, enhancing)
            parts["mass_tumour"] = _scatter(n, idx, lesion)
            mcore = _soft(f.necrosis - mrho, edge) if f.necrosis > 0 else 0.0
            parts["mass_enhancing_mirror"] = _scatter(n, midx, np.clip(_soft(1.0 - mrho, edge) - mcore, 0, 1) * mb)
        else:
            frac[CLASSES.index("blood"), idx] += lesion
            parts["blood"] = _scatter(n, idx, lesion)
            parts["blood_mirror"] = _scatter(n, midx, _soft(1.0 - mrho, edge) * mb)
        parts[f"{f.name}_oedema"] = _scatter(n, idx, oedema)
        masks[f.name] = _scatter(n, idx, np.clip(lesion + oedema, 0.0, 1.0))
        mirror[f.name] = _scatter(n, midx, np.clip(_soft(1.0 + f.oedema_mm / mean_r - mrho, 4.0 / mean_r) * mb, 0.0, 1.0))
    if atrophy is not None:
        mirror["atrophy"] = np.zeros(len(q))
    return Composition(fractions=frac, masks=masks, mirror=mirror, parts=parts)
