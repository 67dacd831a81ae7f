"""Head anatomy for the phantom consortium: the MNI152 2009a brain with a synthetic skull and scalp.

Real brain anatomy comes from the MNI152 2009a (symmetric) T1, grey-matter and white-matter
templates that nilearn ships inside its wheel (read with ``nilearn.datasets.load_mni152_*``, which
never downloads). CSF is the brain support minus GM and WM. The template is skull-stripped, but CT
needs bone and real MRI shows the whole head, so skull (inner table, diploë, outer table) and scalp
(galea/muscle, subcutaneous fat, skin) are grown around a smoothed brain envelope by distance
layers whose thickness varies smoothly over the head.

Everything is built once per process at 2 mm (:func:`head_atlas`) as a stack of tissue fractions
plus two distance maps that later drive atrophy (distance to the ventricles and to the cortical
CSF). Subjects are made by *sampling* this atlas through a per-subject world-to-template mapping
(random affine plus smooth elastic displacement, :class:`SubjectTransform`), so no per-subject
volume is ever resampled twice and any acquisition grid can be rendered directly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from nilearn import datasets
from scipy import ndimage as ndi

VOXEL_MM = 2.0
# Tissue channels of the atlas, in this order. Air is whatever fraction is left.
TISSUES = ("gm", "wm", "csf", "bone", "marrow", "soft", "fat")
# Extra channels sampled with the tissues: distance (mm) to the ventricles and to cortical CSF.
DISTANCES = ("dist_vent", "dist_sulc")
CHANNELS = TISSUES + DISTANCES


@dataclass(frozen=True)
class HeadAtlas:
    """Tissue fractions and distance maps on a 2 mm RAS grid in MNI space.

    ``data[c, i, j, k]`` is channel ``CHANNELS[c]`` at voxel (i, j, k); ``affine`` maps voxel
    indices to MNI millimetres. ``depth_mm`` is the distance from each voxel to the outside of the
    brain (used to keep lesions inside the brain) and ``parenchyma`` the GM+WM fraction.
    """

    data: np.ndarray  # float32 [C, X, Y, Z]
    affine: np.ndarray
    depth_mm: np.ndarray  # float32 [X, Y, Z]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[1:])  # type: ignore[return-value]

    def channel(self, name: str) -> np.ndarray:
        return self.data[CHANNELS.index(name)]

    def world(self, ijk: np.ndarray) -> np.ndarray:
        """MNI millimetres of voxel indices ``ijk`` [..., 3]."""
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


def _load_templates() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The bundled 1 mm MNI152 2009a T1, GM and WM templates (values 0..1) and their affine."""
    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    wm = datasets.load_mni152_wm_template(resolution=1)
    arrays = [np.asarray(img.get_fdata(dtype=np.float32)) for img in (t1, gm, wm)]
    return arrays[0], arrays[1], arrays[2], np.asarray(t1.affine, dtype=np.float64)


def _downsample(a: np.ndarray) -> np.ndarray:
    """2x2x2 block mean (partial-volume correct for fractions); odd trailing planes are dropped."""
    x, y, z = (s // 2 * 2 for s in a.shape)
    a = a[:x, :y, :z]
    return a.reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5))


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """A smooth random field with zero mean and unit standard deviation."""
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (f - f.mean()) / (f.std() + 1e-8)


def _ventricles(csf: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Lateral and third ventricles: large connected CSF pools in the central brain."""
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    box = (np.abs(x) < 32) & (y > -50) & (y < 35) & (z > -12) & (z < 38)
    pool = (csf > 0.45) & box
    labels, n = ndi.label(pool)
    if n == 0:
        return pool
    sizes = ndi.sum(pool, labels, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1
    return np.isin(labels, keep)


@functools.lru_cache(maxsize=1)
def head_atlas() -> HeadAtlas:
    """Build the 2 mm head atlas (a few seconds, once per process).

    Skull and scalp layers are defined by the distance ``d`` (mm) outside a smoothed brain
    envelope; the layer boundaries are scaled by a smooth field so bone is thicker over the
    occiput and thinner over the temporal squama, and a temporalis muscle is added laterally.
    """
    t1, gm1, wm1, aff1 = _load_templates()
    support1 = ndi.binary_fill_holes(t1 > 0.12).astype(np.float32)
    gm = _downsample(gm1)
    wm = _downsample(wm1)
    support = _downsample(support1)
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(support - gm - wm, 0.0, 1.0)

    affine = aff1.copy()
    affine[:3, :3] *= 2.0
    affine[:3, 3] += 0.5 * np.diag(aff1[:3, :3])  # centre of the 2x2x2 block
    shape = gm.shape
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    world = (ijk @ affine[:3, :3].T + affine[:3, 3]).astype(np.float32)
    x, y, z = world[..., 0], world[..., 1], world[..., 2]

    brain = (gm + wm + csf) > 0.5
    depth_mm = ndi.distance_transform_edt(brain).astype(np.float32) * VOXEL_MM

    # Head envelope: the brain smoothed over sulci and the interhemispheric fissure.
    envelope = ndi.gaussian_filter(brain.astype(np.float32), 3.0) > 0.25
    envelope = ndi.binary_fill_holes(envelope)
    d = ndi.distance_transform_edt(~envelope).astype(np.float32) * VOXEL_MM

    rng = np.random.default_rng(20090)  # fixed: the atlas is part of the benchmark definition
    thick = 1.0 + 0.12 * _smooth_noise(shape, rng, 6.0)
    thick *= 1.0 + 0.25 * np.clip((-y - 60.0) / 40.0, 0.0, 1.0)  # occipital bone is thicker
    temporal = np.clip((np.abs(x) - 45.0) / 15.0, 0.0, 1.0) * np.clip((25.0 - np.abs(z - 5.0)) / 15.0, 0.0, 1.0)
    thick *= 1.0 - 0.3 * temporal  # thin temporal squama
    muscle = 1.5 + 5.0 * temporal  # temporalis muscle

    def band(lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
        """Fraction of a 2 mm voxel whose centre distance ``d`` lies in [lo, hi) (soft edges)."""
        return np.clip(np.minimum(d - lo + 1.0, hi - d + 1.0) / 2.0, 0.0, 1.0) * (np.asarray(hi) > lo)

    outside = ~envelope
    e0 = 1.0  # extra-axial CSF and dura
    b0 = e0
    b1 = b0 + 1.6 * thick  # inner table
    b2 = b1 + 2.6 * thick  # diploë
    b3 = b2 + 1.8 * thick  # outer table
    s1 = b3 + muscle  # galea and muscle
    s2 = s1 + 3.0 + 1.0 * np.clip(_smooth_noise(shape, rng, 8.0), -1.5, 1.5)  # subcutaneous fat
    s3 = s2 + 1.5  # skin

    extra_csf = band(0.0, e0) * outside
    bone = (band(b0, b1) + band(b2, b3)) * outside
    marrow = band(b1, b2) * outside
    soft = (band(b3, s1) + band(s2, s3)) * outside
    fat = band(s1, s2) * outside
    csf = np.clip(csf + extra_csf, 0.0, 1.0)

    stack = np.stack([gm, wm, csf, bone, marrow, soft, fat]).astype(np.float32)
    s = stack.sum(axis=0)
    over = s > 1.0
    stack[:, over] /= s[over]

    vent = _ventricles(csf, world)
    dist_vent = ndi.distance_transform_edt(~vent).astype(np.float32) * VOXEL_MM
    cortical_csf = (csf > 0.5) & ~vent
    dist_sulc = ndi.distance_transform_edt(~cortical_csf).astype(np.float32) * VOXEL_MM
    data = np.concatenate([stack, dist_vent[None], dist_sulc[None]]).astype(np.float32)
    return HeadAtlas(data=np.ascontiguousarray(data), affine=affine, depth_mm=depth_mm)


@dataclass(frozen=True)
class SubjectTransform:
    """World (scanner, mm) to template (MNI, mm) mapping of one subject.

    ``q = inv(A) @ (w - t) + elastic(w)``: ``A`` is rotation times anisotropic scale (head size and
    shape), ``t`` the head position in the scanner, and the elastic term a sum of a few random
    low-frequency sinusoids per axis: smooth, cheap to evaluate anywhere, and deterministic.
    """

    matrix: np.ndarray  # 3x3, template -> world linear part
    translation: np.ndarray  # 3
    wave_k: np.ndarray  # [3, n, 3] spatial frequencies (rad/mm)
    wave_phase: np.ndarray  # [3, n]
    wave_amp: np.ndarray  # [3, n] mm

    @staticmethod
    def random(rng: np.random.Generator, rotation_deg: float = 8.0, scale: float = 0.06,
               shift_mm: float = 6.0, elastic_mm: float = 2.5, waves: int = 4) -> "SubjectTransform":
        angles = np.deg2rad(rng.uniform(-1, 1, 3) * np.array([rotation_deg, rotation_deg * 0.6, rotation_deg * 0.6]))
        cx, cy, cz = np.cos(angles)
        sx, sy, sz = np.sin(angles)
        rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        size = 1.0 + rng.uniform(-scale, scale)  # global head size
        aniso = 1.0 + rng.uniform(-scale / 2, scale / 2, 3)
        matrix = rz @ ry @ rx @ np.diag(size * aniso)
        translation = rng.uniform(-shift_mm, shift_mm, 3)
        wavelength = rng.uniform(60.0, 140.0, (3, waves))
        direction = rng.standard_normal((3, waves, 3))
        direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
        wave_k = direction * (2 * np.pi / wavelength)[..., None]
        phase = rng.uniform(0, 2 * np.pi, (3, waves))
        amp = rng.uniform(0.3, 1.0, (3, waves)) * elastic_mm / np.sqrt(waves)
        return SubjectTransform(matrix, translation, wave_k, phase, amp)

    def __call__(self, w: np.ndarray) -> np.ndarray:
        """Template coordinates of world points ``w`` [N, 3] (float32)."""
        w = np.asarray(w, dtype=np.float32)
        q = _linear(w - self.translation.astype(np.float32), np.linalg.inv(self.matrix))
        for axis in range(3):
            phase = _linear(w, self.wave_k[axis]) + self.wave_phase[axis].astype(np.float32)
            q[:, axis] += _linear(np.sin(phase), self.wave_amp[axis][:, None])[:, 0]
        return q


def _linear(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``x @ m.T`` for [N, k] float32 points and a small [n, k] matrix (faster than matmul here)."""
    m = np.asarray(m, dtype=np.float32)
    out = np.empty((len(x), m.shape[0]), dtype=np.float32)
    for r in range(m.shape[0]):
        acc = x[:, 0] * m[r, 0]
        for c in range(1, m.shape[1]):
            acc += x[:, c] * m[r, c]
        out[:, r] = acc
    return out


def sample_atlas(atlas: HeadAtlas, q: np.ndarray) -> np.ndarray:
    """Trilinear samples of every atlas channel at template points ``q`` [N, 3] -> [C, N].

    Points outside the atlas read as air (zero tissue) with large distances.
    """
    inv = np.linalg.inv(atlas.affine)
    ijk = _linear(q, inv[:3, :3]) + inv[:3, 3].astype(np.float32)
    norm = ijk * (2.0 / (np.array(atlas.shape, dtype=np.float32) - 1.0)) - 1.0
    # grid_sample's last grid dimension is (W, H, D) = (k, j, i) for an input laid out [C, i, j, k].
    grid = torch.from_numpy(np.ascontiguousarray(norm[:, ::-1], dtype=np.float32)).view(1, 1, 1, -1, 3)
    vol = torch.from_numpy(atlas.data).unsqueeze(0)
    out = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out.view(len(CHANNELS), -1).numpy().copy()
    outside = np.any((norm < -1.0) | (norm > 1.0), axis=1)
    for name in DISTANCES:
        out[CHANNELS.index(name), outside] = 100.0
    return out
