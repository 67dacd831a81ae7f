"""From tissue fractions to pixel values: contrast physics and scanner effects.

Every class has a mean signal per contrast, chosen from how radiology describes it:

* CT (Hounsfield units): air -1000, fat -100, CSF 8, white matter 27, grey matter 38, acute blood
  65 (hyperdense), infarct 17 and oedema 18 (hypodense), solid tumour 31 (iso- to hypodense),
  necrosis 15, bone 1100 with fatty diploë.
* T1: WM > GM > CSF, fat bright; oedema and infarct dark; early subacute blood bright
  (methaemoglobin).
* T2: CSF > GM > WM; oedema, infarct and necrosis bright; blood dark (deoxy-/intracellular
  methaemoglobin).
* FLAIR: CSF suppressed (dark), oedema and infarct the brightest brain tissue.
* T1C: T1 plus gadolinium where the blood-brain barrier is broken: the enhancing tumour rim, and
  mildly the scalp and mucosa.

A scan value is the fraction-weighted mix of these means, times a smooth per-tissue texture,
then the site's scanner effects: an intensity scale (MR units are arbitrary), a multiplicative
bias field, Rician (MR) or Gaussian (CT) noise and a per-site tweak of the tissue contrast.
"""

from __future__ import annotations

import numpy as np

from hlip_fed.synth.lesions import CLASSES

SEQUENCES = ("T1", "T2", "FLAIR", "T1C", "CT")

#                 gm    wm    csf   bone  marrow soft  fat   enh   necro oedema blood infarct
_TABLE = {
    "T1":    [0.55, 0.80, 0.18, 0.05, 0.75, 0.45, 0.95, 0.48, 0.22, 0.42, 1.00, 0.36],
    "T2":    [0.60, 0.45, 1.00, 0.05, 0.55, 0.35, 0.70, 0.62, 0.95, 0.85, 0.18, 0.86],
    "FLAIR": [0.62, 0.48, 0.08, 0.05, 0.55, 0.35, 0.65, 0.70, 0.30, 0.92, 0.25, 0.92],
    "T1C":   [0.57, 0.80, 0.18, 0.05, 0.75, 0.60, 0.95, 1.30, 0.22, 0.42, 1.00, 0.38],
    "CT":    [38.0, 27.0, 8.0, 1100.0, 450.0, 40.0, -100.0, 31.0, 15.0, 18.0, 65.0, 17.0],
}
AIR = {"T1": 0.0, "T2": 0.0, "FLAIR": 0.0, "T1C": 0.0, "CT": -1000.0}
# Tissue contrast that a site's scanner may shift (fraction); lesion contrast is left alone so the
# direction of every finding's appearance is the same at every site.
_TWEAKABLE = ("gm", "wm", "csf", "soft", "fat", "marrow")


def class_means(sequence: str, tweak: dict[str, float] | None = None) -> np.ndarray:
    """Mean signal of each class in :data:`CLASSES` for ``sequence``, with a site's tweak."""
    means = np.array(_TABLE[sequence], dtype=np.float32)
    if tweak and sequence != "CT":
        for name, delta in tweak.items():
            if name in _TWEAKABLE:
                means[CLASSES.index(name)] *= 1.0 + delta
    return means


def smooth_field(points: np.ndarray, rng: np.random.Generator, wavelength_mm: tuple[float, float],
                 waves: int = 6) -> np.ndarray:
    """A smooth zero-mean random field at ``points`` [N, 3] (mm), unit-ish standard deviation."""
    out = np.zeros(len(points), dtype=np.float32)
    for _ in range(waves):
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d)
        k = 2 * np.pi / rng.uniform(*wavelength_mm)
        out += np.cos(points @ (d * k).astype(np.float32) + np.float32(rng.uniform(0, 2 * np.pi)))
    return out * np.float32(np.sqrt(2.0 / waves))


def mix(fractions: np.ndarray, sequence: str, texture: np.ndarray, tweak: dict[str, float] | None = None) -> np.ndarray:
    """Signal at each point: fraction-weighted class means, modulated by ``texture``.

    ``texture`` [N] is a smooth random field in template space (so it is the same tissue
    heterogeneity in every scan of a study); it modulates soft tissue by a few percent.
    """
    means = class_means(sequence, tweak)
    tissue = fractions.sum(axis=0)
    air = np.clip(1.0 - tissue, 0.0, 1.0)
    if sequence == "CT":
        value = means @ fractions + air * AIR["CT"]
        return value + 2.0 * texture * np.clip(tissue - fractions[CLASSES.index("bone")], 0, 1)
    value = means @ fractions
    return value * (1.0 + 0.04 * texture)


def scanner(value: np.ndarray, sequence: str, world: np.ndarray, site: dict, rng: np.random.Generator) -> np.ndarray:
    """Apply a site's scanner to ideal signal ``value`` at world points ``world`` [N, 3].

    MR: bias field exp(b * smooth), intensity scale, Rician noise with sigma relative to white
    matter. CT: a calibration offset and Gaussian quantum noise in HU (thinner slices are noisier).
    """
    if sequence == "CT":
        sigma = float(site["noise"]) * np.sqrt(5.0 / float(site["slice_mm"]))
        return value + float(site.get("offset", 0.0)) + _gauss(rng, sigma, value.shape)
    bias = np.exp(float(site["bias"]) * smooth_field(world, rng, (180.0, 320.0), 4))
    signal = value * bias * float(site["scale"])
    sigma = float(site["noise"]) * float(site["scale"]) * class_means(sequence)[CLASSES.index("wm")]
    real = signal + _gauss(rng, sigma, value.shape)
    imag = _gauss(rng, sigma, value.shape)
    return np.sqrt(real**2 + imag**2)


def _gauss(rng: np.random.Generator, sigma: float, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
