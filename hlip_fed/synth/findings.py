"""The finding vocabulary of the phantom consortium and how a study's findings are drawn.

This module is the single source of truth for label names: evaluation code imports
:data:`FINDINGS` so that truth files, prompts and metrics always agree. A study has zero or more
findings (multi-label); a study with none is normal. Each finding carries the attributes a
radiologist reports: side, lobe or region, size and, where it applies, vascular territory or
severity. Positions are MNI millimetres in the template (x > 0 is the patient's right).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from hlip_fed.synth.anatomy import HeadAtlas

FINDINGS: tuple[str, ...] = ("mass", "haemorrhage", "infarct", "atrophy")

# Human-readable names (for tables and figures, not for reports or prompts).
FINDING_TITLES = {
    "mass": "Mass / tumour",
    "haemorrhage": "Intracranial haemorrhage",
    "infarct": "Ischaemic infarct",
    "atrophy": "Atrophy / ventricular enlargement",
}

REGIONS = ("frontal", "parietal", "temporal", "occipital", "basal ganglia", "cerebellum")


@dataclass
class Finding:
    """One abnormality of a study, as the ground truth records it.

    ``centre`` and ``radii`` (mm) with ``axes`` (rows: unit vectors) describe an irregular
    ellipsoid in template space; ``seed`` drives its surface irregularity. ``size_cm`` holds the
    two largest diameters as a report would measure them.
    """

    name: str
    laterality: str  # "left" | "right" | "bilateral"
    region: str  # one of REGIONS, or "global" for atrophy
    size_cm: list[float] = field(default_factory=list)
    centre: list[float] = field(default_factory=list)
    radii: list[float] = field(default_factory=list)
    axes: list[list[float]] = field(default_factory=list)
    seed: int = 0
    territory: str | None = None  # infarct: "MCA" | "ACA" | "PCA" | "lenticulostriate"
    severity: str | None = None  # atrophy: "mild" | "moderate" | "severe"
    necrosis: float = 0.0  # mass: relative radius of the necrotic core (0: solid)
    oedema_mm: float = 0.0  # width of the surrounding oedema (mass, haemorrhage)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("centre", "radii", "size_cm"):
            d[key] = [round(float(v), 2) for v in d[key]]
        d["axes"] = [[round(float(v), 4) for v in row] for row in d["axes"]]
        return {k: v for k, v in d.items() if v is not None}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Finding":
        return Finding(**d)


def region_of(point: np.ndarray) -> str:
    """Lobe or region of an MNI point, from coarse landmarks of the symmetric template."""
    x, y, z = (float(v) for v in point)
    if z < -18 and y < -42:
        return "cerebellum"
    if abs(x) < 32 and -22 < y < 24 and -8 < z < 22:
        return "basal ganglia"
    if y < -70:
        return "occipital"
    if z < 6 and -70 <= y < 22 and abs(x) > 28:
        return "temporal"
    if y < -20:
        return "parietal"
    return "frontal"


def side_of(point: np.ndarray) -> str:
    return "right" if float(point[0]) > 0 else "left"


def _random_axes(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    return q.T  # rows are orthonormal directions


def _candidates(atlas: HeadAtlas, rng: np.random.Generator, min_depth: float, wm_min: float,
                regions: tuple[str, ...], side: str | None, n: int = 400) -> np.ndarray:
    """Random MNI points inside the brain parenchyma, deep enough, in one of ``regions``."""
    wm = atlas.channel("wm")
    gm = atlas.channel("gm")
    ok = (atlas.depth_mm >= min_depth) & (wm >= wm_min) & (gm + wm > 0.6)
    idx = np.argwhere(ok)
    if len(idx) == 0:
        return np.zeros((0, 3))
    pick = idx[rng.choice(len(idx), size=min(n, len(idx)), replace=False)]
    pts = atlas.world(pick.astype(np.float64)) + rng.uniform(-1, 1, (len(pick), 3))
    keep = [i for i, p in enumerate(pts) if region_of(p) in regions and (side is None or side_of(p) == side)]
    return pts[keep]


def _far_from(p: np.ndarray, placed: list[tuple[np.ndarray, float]], r: float) -> bool:
    return all(np.linalg.norm(p - c) > r + rc + 6.0 for c, rc in placed)


def _place(atlas: HeadAtlas, rng: np.random.Generator, radius: float, wm_min: float,
           regions: tuple[str, ...], placed: list[tuple[np.ndarray, float]], depth_factor: float = 1.0) -> np.ndarray | None:
    side = None
    for attempt in range(6):
        depth = max(4.0, radius * depth_factor * (1.0 - 0.12 * attempt))
        pts = _candidates(atlas, rng, depth, wm_min, regions, side)
        for p in pts:
            if _far_from(p, placed, radius):
                return p
    return None


def _diameters(radii: np.ndarray, axes: np.ndarray) -> list[float]:
    """The two largest axial-plane diameters (cm) of an ellipsoid, largest first."""
    # Extent of the ellipsoid along world x and y.
    ext = [2 * np.sqrt(np.sum((radii * axes[:, k]) ** 2)) / 10.0 for k in (0, 1, 2)]
    a, b = sorted(ext[:2], reverse=True)
    return [round(a, 1), round(b, 1)]


def _infarct(rng: np.random.Generator, placed: list[tuple[np.ndarray, float]]):
    """Centre, radii, axes and attributes of an infarct in a random arterial territory.

    MCA infarcts sit laterally over the convexity, ACA ones parasagittally, PCA ones in the
    occipital lobe and lenticulostriate (lacunar) ones deep in the basal ganglia. Tries again
    until the infarct does not overlap the study's other lesions.
    """
    for _ in range(40):
        territory = str(rng.choice(["MCA", "MCA", "MCA", "ACA", "PCA", "lenticulostriate"]))
        side = 1.0 if rng.random() < 0.5 else -1.0
        axes = np.eye(3)
        if territory == "lenticulostriate":
            r = float(rng.uniform(5.0, 9.0))
            c0 = np.array([side * rng.uniform(18, 28), rng.uniform(-10, 12), rng.uniform(0, 14)])
            radii = r * rng.uniform(0.8, 1.2, 3)
        else:
            r = float(rng.uniform(10.0, 24.0))
            if territory == "MCA":
                c0 = np.array([side * rng.uniform(44, 56), rng.uniform(-45, 15), rng.uniform(-2, 35)])
                radii = np.array([r * rng.uniform(0.7, 1.0), r * rng.uniform(1.0, 1.5), r * rng.uniform(0.9, 1.3)])
            elif territory == "ACA":
                c0 = np.array([side * rng.uniform(6, 12), rng.uniform(-10, 35), rng.uniform(30, 55)])
                radii = np.array([r * 0.55, r * rng.uniform(1.0, 1.5), r * rng.uniform(0.8, 1.1)])
            else:  # PCA
                c0 = np.array([side * rng.uniform(10, 25), rng.uniform(-95, -75), rng.uniform(-5, 15)])
                radii = np.array([r * rng.uniform(0.7, 1.0), r * rng.uniform(1.0, 1.4), r * rng.uniform(0.7, 1.0)])
        if _far_from(c0, placed, float(np.max(radii))):
            return c0, radii, axes, {"territory": territory}
    return None, None, None, {}


def draw_findings(atlas: HeadAtlas, labels: dict[str, int], rng: np.random.Generator) -> list[Finding]:
    """Concrete findings (position, size, attributes) for the requested positive ``labels``.

    Sizes are drawn wide on purpose, from subtle (about 1 cm) to large, so that some cases stay
    hard at the model's input resolution. Lesions of one study never overlap.
    """
    findings: list[Finding] = []
    placed: list[tuple[np.ndarray, float]] = []
    order = [f for f in ("mass", "haemorrhage", "infarct") if labels.get(f)]
    for name in order:
        seed = int(rng.integers(2**31))
        axes = _random_axes(rng)
        if name == "mass":
            r = float(rng.uniform(6.0, 24.0))
            radii = r * rng.uniform(0.8, 1.2, 3)
            necrosis = float(rng.uniform(0.35, 0.65)) if r > 13 and rng.random() < 0.75 else 0.0
            oedema = float(rng.uniform(0.4, 1.0) * r + 3.0)
            regions = ("frontal", "parietal", "temporal", "occipital", "basal ganglia", "cerebellum")
            c = _place(atlas, rng, r, 0.3, regions, placed, 0.9)
            extra: dict[str, Any] = {"necrosis": round(necrosis, 3), "oedema_mm": round(oedema, 2)}
        elif name == "haemorrhage":
            r = float(rng.uniform(5.0, 20.0))
            radii = r * np.array([1.0, rng.uniform(0.6, 0.9), rng.uniform(0.6, 1.0)])
            regions = ("basal ganglia",) if rng.random() < 0.45 else ("frontal", "parietal", "temporal", "occipital", "cerebellum")
            c = _place(atlas, rng, r, 0.2, regions, placed, 0.8)
            extra = {"oedema_mm": round(float(rng.uniform(1.5, 4.0)), 2)}
        else:  # infarct: a wedge of cortex and white matter in one arterial territory
            c, radii, axes, extra = _infarct(rng, placed)
            if c is not None:
                r = float(np.max(radii))
        if c is None:
            continue  # no room left: the label is dropped so truth matches the image
        radii = np.asarray(radii, dtype=np.float64)
        region = region_of(c)
        if name == "infarct" and extra.get("territory") == "lenticulostriate":
            region = "basal ganglia"
        findings.append(Finding(
            name=name, laterality=side_of(c), region=region, size_cm=_diameters(radii, np.asarray(axes)),
            centre=[float(v) for v in c], radii=[float(v) for v in radii],
            axes=[[float(v) for v in row] for row in np.asarray(axes)], seed=seed, **extra,
        ))
        placed.append((c, float(radii.max()) + extra.get("oedema_mm", 0.0)))
    if labels.get("atrophy"):
        severity = str(rng.choice(["mild", "moderate", "moderate", "severe"]))
        findings.append(Finding(name="atrophy", laterality="bilateral", region="global", severity=severity,
                                seed=int(rng.integers(2**31))))
    return findings


def labels_of(findings: list[Finding]) -> dict[str, int]:
    present = {f.name for f in findings}
    return {name: int(name in present) for name in FINDINGS}
