"""Where in a study HLIP finds what a text says: gradient x input maps over the patch tokens.

HLIP's attention runs through ``scaled_dot_product_attention``, which never materialises attention
weights, and its CLS token is split into and merged out of slice, scan and study windows, so an
attention rollout from "the" CLS token is not well defined. The map here is gradient x input on
the patch tokens instead: for the image-text similarity ``s = <image_emb, text_emb>``, a patch
token ``t`` (its patch embedding, before position embeddings) scores
``sum_c (t_c - b_c) * ds/dt_c`` with the baseline ``b`` the scan's mean patch token: the first-order
change of the similarity if that patch were replaced by an average patch of the same scan. Without
a baseline every bright, ordinary patch scores high simply for being large; with it, a patch
scores for being *different* in the direction the text cares about. Positive scores pull the
study towards the text. It is one backward pass, needs no change to the model and makes no claim
beyond the linearisation it is.

A zero-shot decision is a choice between texts, and a CLIP-style embedding space has a large
component that every report shares: the similarity to one text alone is mostly that component,
so its map shows what makes a study look like *any* report. With a ``versus`` text the map
explains ``s(text) - s(versus)``, the logit difference the zero-shot classifier thresholds
("an intracranial bleed" versus "no intracranial bleed"); the shared component cancels.

Patch scores live on each scan's patch grid in the model's input space; they are mapped back to
the scan as it was read (inverting the preprocessing geometry) to be overlaid on axial, coronal
and sagittal slices through each scan's strongest patch.

:func:`lesion_hit_test` checks a model's maps against ground-truth masks: is the strongest patch
inside the brain on the lesion more often than a random patch inside the brain would be? The
null distribution is exact (Poisson-binomial over the per-lesion chance rates).
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from hlip_fed.data.preprocess import from_model_grid
from hlip_fed.downstream.inference import load_study_tensor
from hlip_fed.errors import HlipError


@dataclass
class ScanMap:
    """One scan's explanation: patch scores on the input grid and the map on the scan's grid."""

    source: str
    patch_scores: np.ndarray  # [gd, gh, gw]
    input_map: np.ndarray  # [D, H, W] of the model input (patch scores, nearest upsampling)
    volume_map: np.ndarray  # on the canonical grid of the scan as read
    peak_patch: tuple[int, int, int]
    peak_voxel: tuple[int, int, int]  # on the scan's grid
    peak_world_mm: tuple[float, float, float]


def patch_scores(model, tokenizer, images: torch.Tensor, text: str,
                 scan_mask: torch.Tensor | None = None, versus: str | None = None) -> tuple[np.ndarray, float]:
    """Gradient x (input - scan mean) of the image-text similarity on the patch tokens.

    ``images`` is one study ``[N, 1, D, H, W]``; returns scores ``[N, gd, gh, gw]`` and the cosine
    similarity itself (with ``versus``: the similarity to ``text`` minus that to ``versus``, which
    is also what the scores explain).
    """
    model.eval()
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        captured["tokens"] = output

    handle = model.visual.patch_embed.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            with torch.no_grad():
                txt = model.encode_text(**tokenizer([text]))
                if versus is not None:
                    txt = txt - model.encode_text(**tokenizer([versus]))
            mask = scan_mask if scan_mask is not None else torch.ones(1, images.shape[0], dtype=torch.bool)
            img = model.encode_image(images[None], mask)
            sim = (img * txt).sum()
            tokens = captured["tokens"]  # [1, N, gd, gh*gw, C]
            (grad,) = torch.autograd.grad(sim, tokens)
    finally:
        handle.remove()
    baseline = tokens.mean(dim=(2, 3), keepdim=True)  # each scan's mean patch token
    score = (grad * (tokens - baseline)).sum(-1)[0].detach()  # [N, gd, gh*gw]
    gd, gh, gw = _grid(model, images)
    return score.reshape(images.shape[0], gd, gh, gw).numpy(), float(sim.detach())


def _grid(model, images: torch.Tensor) -> tuple[int, int, int]:
    return tuple(int(s) // int(p) for s, p in zip(images.shape[-3:], model.visual.patch_embed.patch_size))


def upsample_patches(scores: np.ndarray, img_size) -> np.ndarray:
    """Patch scores ``[gd, gh, gw]`` -> ``[D, H, W]``, each patch's voxels holding its score."""
    reps = [int(s) // int(g) for s, g in zip(img_size, scores.shape)]
    return np.kron(scores, np.ones(reps, dtype=scores.dtype))


def to_volume_grid(input_map: np.ndarray, volume, data_cfg, img_size) -> np.ndarray:
    """Undo the preprocessing geometry: a map on the model input grid -> the scan's grid."""

    return from_model_grid(input_map, volume.shape, volume.spacing, data_cfg, img_size)


def explain_study(model, tokenizer, study, text: str, data_cfg,
                  versus: str | None = None) -> tuple[list[ScanMap], float, list]:
    """Per-scan maps of one study for ``text`` (against ``versus``); also the similarity (difference)
    and the scans' Volumes."""

    img_size = [int(s) for s in model.cfg.vision.img_size]
    images, volumes = load_study_tensor(study, data_cfg, img_size)
    scores, sim = patch_scores(model, tokenizer, images, text, versus=versus)
    out = []
    for k, vol in enumerate(volumes):
        s = scores[k]
        peak = tuple(int(i) for i in np.unravel_index(int(np.argmax(s)), s.shape))
        imap = upsample_patches(s, img_size)
        vmap = to_volume_grid(imap, vol, data_cfg, img_size)
        pv = tuple(int(i) for i in np.unravel_index(int(np.argmax(vmap)), vmap.shape))
        world = tuple(float(x) for x in (vol.affine @ np.array([*pv, 1.0]))[:3])
        out.append(ScanMap(str(vol.source), s, imap, vmap, peak, pv, world))
    return out, sim, volumes


# --- the lesion test -------------------------------------------------------------------------
def patch_view(mask: np.ndarray, grid) -> np.ndarray:
    """A voxel mask ``[D, H, W]`` as ``[gd, gh, gw, voxels per patch]``."""
    gd, gh, gw = grid
    d, h, w = (n // g for n, g in zip(mask.shape, grid))
    return mask.reshape(gd, d, gh, h, gw, w).transpose(0, 2, 4, 1, 3, 5).reshape(gd, gh, gw, -1)


def foreground_mask(x: np.ndarray) -> np.ndarray:
    """Non-background voxels of a preprocessed scan: above a fifth of the way from its 1st to its
    99th percentile (background is near the bottom of the intensity range after scaling)."""
    lo, hi = np.percentile(x, [1, 99])
    return x > lo + 0.2 * (hi - lo)


@dataclass
class HitTest:
    hits: int
    n: int
    hit_rate: float
    chance_rate: float  # mean over lesions of the chance that a random brain patch touches it
    p_value: float  # P(random patches hit at least ``hits`` lesions)


def poisson_binomial_sf(p: np.ndarray, k: int) -> float:
    """P(X >= k) for X a sum of independent Bernoulli(p_i) (exact, by dynamic programming)."""
    dist = np.zeros(len(p) + 1)
    dist[0] = 1.0
    for pi in p:
        dist[1:] = dist[1:] * (1 - pi) + dist[:-1] * pi
        dist[0] *= 1 - pi
    return float(dist[k:].sum())


def lesion_hit(scores: np.ndarray, lesion: np.ndarray, brain: np.ndarray, min_brain: float = 0.5) -> tuple[bool, float]:
    """Does the strongest brain patch touch the lesion, and what is the chance for a random one?

    ``scores`` ``[gd, gh, gw]`` patch scores; ``lesion`` and ``brain`` voxel masks on the model input
    grid. Candidate regions are the patches at least ``min_brain`` inside the brain; the strongest
    candidate hits when it holds a lesion voxel. The chance rate is the fraction of candidates that
    hold one: an equal-size region placed at random inside the brain.
    """
    grid = scores.shape
    inside = patch_view(brain, grid).mean(-1) >= min_brain
    touches = patch_view(lesion, grid).any(-1)
    if not inside.any():
        raise HlipError("no patch lies inside the brain mask")
    masked = np.where(inside, scores, -np.inf)
    peak = np.unravel_index(int(np.argmax(masked)), grid)
    return bool(touches[peak]), float(touches[inside].mean())


def lesion_hit_test(results: list[tuple[bool, float]]) -> HitTest:
    """Combine :func:`lesion_hit` results: one-sided exact test against random brain patches."""
    hits = sum(int(h) for h, _ in results)
    chance = np.array([c for _, c in results])
    return HitTest(hits, len(results), hits / max(len(results), 1), float(chance.mean()),
                   poisson_binomial_sf(chance, hits))


# --- the figure ------------------------------------------------------------------------------
def _to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip a canonical array to RAS index order (for display); returns it and the RAS
    voxel sizes."""

    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(array, ornt)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    spacing = np.empty(3)
    for src, (dst, _) in enumerate(ornt):
        spacing[int(dst)] = zooms[src]
    return out, spacing


def plot_maps(maps: list[ScanMap], volumes: list, path, text: str, title: str | None = None):
    """One row per scan: axial, coronal, sagittal slices through the scan's peak, the positive
    part of the map overlaid (neurological view: the patient's right on the image's right)."""
    import matplotlib  # lazy: only drawing imports pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(maps), 3, figsize=(9, 3.1 * len(maps)), squeeze=False)
    for row, (m, vol) in enumerate(zip(maps, volumes)):
        img, sp = _to_ras(vol.array, vol.affine)
        heat, _ = _to_ras(np.clip(m.volume_map, 0, None), vol.affine)
        top = heat.max()
        heat = heat / top if top > 0 else heat
        ornt = nib.orientations.io_orientation(vol.affine)
        peak = [0, 0, 0]
        for src, (dst, flip) in enumerate(ornt):
            n = vol.array.shape[src]
            peak[int(dst)] = (n - 1 - m.peak_voxel[src]) if flip < 0 else m.peak_voxel[src]
        lo, hi = np.percentile(img, [1, 99.5])
        views = (("axial", img[:, :, peak[2]], heat[:, :, peak[2]], sp[1] / sp[0]),
                 ("coronal", img[:, peak[1], :], heat[:, peak[1], :], sp[2] / sp[0]),
                 ("sagittal", img[peak[0], :, :], heat[peak[0], :, :], sp[2] / sp[1]))
        for col, (name, sl, hm, aspect) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(sl.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
            ax.imshow(hm.T, cmap="hot", origin="lower", alpha=0.45 * (hm.T > 0.2), vmin=0, vmax=1, aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"scan {row + 1}: {str(m.source).split('/')[-1]}"[:40], fontsize=8)
    fig.suptitle((title + "\n" if title else "") + f"gradient x input for: {text!r}"[:120], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
