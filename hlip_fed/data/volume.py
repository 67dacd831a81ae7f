"""One scan in memory, in one canonical orientation.

Canonical orientation (the contract every reader keeps, so that the same anatomy stored as NIfTI in
any orientation or as a DICOM series yields the same array):

1. the voxel axes are brought to the closest RAS+ orientation (index increases towards patient
   Right, Anterior, Superior), with nibabel's orientation tools, i.e. flips and axis permutations
   only, never interpolation;
2. the axes are then permuted so that array axis 0 (depth, ``D``) is the axis with the largest voxel
   spacing (the slice axis of a thick-slice acquisition), superior-inferior when spacings tie
   (within 1 %), then anterior-posterior; the two in-plane axes follow in the order S, A, R.

An axial CT therefore reads as ``(S, A, R)``, a sagittal thick-slice MR as ``(R, S, A)`` and a
coronal one as ``(A, S, R)``. The affine always maps the array *as stored* (after the permutation)
to RAS+ world millimetres, so world coordinates are never lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

# Axis priority for ties and for the in-plane order: S (RAS index 2), A (1), R (0).
_PRIORITY = (2, 1, 0)
_TIE_RTOL = 1e-2


@dataclass
class Volume:
    """A 3D scan as read from disk.

    ``array`` is float32 in canonical axis order (see the module docstring) holding the stored
    intensities after the modality rescale (Hounsfield units for CT); ``affine`` maps voxel indices
    of ``array`` to RAS+ world millimetres; ``spacing`` is the voxel size in mm along the three
    array axes; ``modality`` is ``"CT"``, ``"MR"`` or another DICOM modality code.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    modality: str
    source: str
    sequence: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # series UID, source orientation, ...
    warnings: list[str] = field(default_factory=list)  # problems that were handled, e.g. gaps

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Axis codes of the stored array, e.g. ``"SAR"`` for an axial scan."""
        return "".join(nib.aff2axcodes(self.affine))

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (used by ``hlip-fed volume info``)."""
        a = self.array
        finite = a[np.isfinite(a)] if a.size else a
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        return {
            "source": self.source,
            "shape": list(self.shape),
            "spacing": [round(float(s), 6) for s in self.spacing],
            "orientation": self.orientation,
            "modality": self.modality,
            "sequence": self.sequence,
            "intensity": {"min": lo, "max": hi, "mean": float(finite.mean()) if finite.size else 0.0},
            "affine": [[round(float(v), 6) for v in row] for row in self.affine],
            **{k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool, list))},
            "warnings": list(self.warnings),
        }


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each array axis: the norms of the affine's first three columns."""
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))


def canonical_order(spacing_ras: np.ndarray) -> tuple[int, int, int]:
    """Permutation of RAS-ordered axes putting the largest spacing first (S, then A on ties)."""
    top = float(np.max(spacing_ras))
    depth = next(ax for ax in _PRIORITY if np.isclose(spacing_ras[ax], top, rtol=_TIE_RTOL, atol=0))
    rest = [ax for ax in _PRIORITY if ax != depth]
    return (depth, rest[0], rest[1])


def canonicalize(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient ``array`` (3D, any orientation described by ``affine``) to canonical order.

    Returns the new array (C-contiguous) and the affine of the array as returned.
    """
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)  # source axes -> closest RAS axes (+ flips)
    ras = nib.orientations.apply_orientation(array, ornt)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    order = canonical_order(voxel_sizes(ras_affine))
    out = np.ascontiguousarray(np.transpose(ras, order))
    out_affine = ras_affine.copy()
    out_affine[:, :3] = ras_affine[:, list(order)]
    return out, out_affine


def make_volume(
    array: np.ndarray,
    affine: np.ndarray,
    modality: str,
    source: str,
    sequence: str | None = None,
    meta: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
) -> Volume:
    """Canonicalise a raw 3D array with its world affine into a :class:`Volume`."""
    source_orientation = "".join(nib.aff2axcodes(affine))
    arr, aff = canonicalize(array, affine)
    meta = dict(meta or {})
    meta.setdefault("source_orientation", source_orientation)
    return Volume(
        array=arr.astype(np.float32, copy=False),
        affine=aff,
        spacing=tuple(float(s) for s in voxel_sizes(aff)),  # type: ignore[arg-type]
        modality=modality,
        source=source,
        sequence=sequence,
        meta=meta,
        warnings=list(warnings or []),
    )
