"""Render one study: subject, findings, acquisitions, scanner effects and report, all in memory.

A :class:`StudyPlan` is everything decided at consortium level (site, split, which findings are
present, scanner and protocol); :func:`render_study` turns it into images, truth masks and a
report, drawing every random choice from one generator seeded by the plan, so a study is the same
whatever order or process it is generated in. Writing to disk is :mod:`hlip_fed.synth.writer`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hlip_fed.synth.anatomy import HeadAtlas, SubjectTransform, head_atlas
from hlip_fed.synth.contrasts import mix, scanner, smooth_field
from hlip_fed.synth.findings import FINDINGS, Finding, draw_findings, labels_of
from hlip_fed.synth.lesions import Composition, atrophy_widths, compose
from hlip_fed.synth.reports import write_report

HEAD_CENTRE_MM = np.array([0.0, -18.0, 14.0])  # centre of the head in MNI space
COVERAGE_MM = 160.0  # superior-inferior coverage of an axial head acquisition
THIN_SLICE_MM = 2.5  # CT second reconstruction


@dataclass
class StudyPlan:
    cohort: str  # site name, or "heldout"
    study_id: str
    split: str  # "train" | "test"
    seed: tuple[int, ...]
    labels: dict[str, int]
    modality: str  # "CT" | "MR"
    fmt: str  # "nifti" | "dicom"
    scanner: dict
    protocol: dict[str, float]  # sequence -> probability of being acquired
    second_recon: float = 0.0
    shuffle: bool = False
    naming: str = "series"
    style: str = "terse"


@dataclass
class Scan:
    name: str  # file or folder name without extension
    sequence: str  # T1 | T2 | FLAIR | T1C | CT
    modality: str
    array: np.ndarray  # float32, RAS voxel order, output units (HU for CT)
    affine: np.ndarray  # voxel -> RAS mm
    slice_mm: float
    series_number: int
    description: str


@dataclass
class RenderedStudy:
    plan: StudyPlan
    findings: list[Finding]
    labels: dict[str, int]
    scans: list[Scan]
    report: str
    ventricle_mm: float
    sulcal_mm: float
    composition: Composition  # on the first scan's grid (all scans of a plain study share it)
    grid_shape: tuple[int, int, int]
    grid_affine: np.ndarray

    def mask(self, name: str, mirror: bool = False) -> np.ndarray:
        """Soft truth mask of finding ``name`` (or its contralateral mirror) on the study grid."""
        src = self.composition.mirror if mirror else self.composition.masks
        return src[name].reshape(self.grid_shape)

    def part(self, name: str) -> np.ndarray:
        return self.composition.parts[name].reshape(self.grid_shape)

    def label_map(self) -> np.ndarray:
        """uint8 bit mask on the study grid: bit i set where finding ``FINDINGS[i]`` is (> 0.5)."""
        out = np.zeros(self.grid_shape, dtype=np.uint8)
        for i, name in enumerate(FINDINGS):
            if name in self.composition.masks:
                out |= (self.mask(name) > 0.5).astype(np.uint8) << i
        return out


def acquisition_grid(sc: dict, slice_mm: float, rng: np.random.Generator) -> tuple[tuple[int, int, int], np.ndarray]:
    """Axial grid (RAS voxel order) of a site's scanner, centred on the head with table jitter."""
    px = float(sc["inplane_mm"])
    n = int(sc["matrix"])
    nz = int(np.ceil(COVERAGE_MM / slice_mm))
    centre = HEAD_CENTRE_MM + rng.uniform(-4.0, 4.0, 3)
    affine = np.diag([px, px, slice_mm, 1.0])
    affine[:3, 3] = centre - affine[:3, :3] @ (np.array([n, n, nz]) - 1) / 2.0
    return (n, n, nz), affine


def grid_points(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float32)
    i, j, k = (np.arange(s, dtype=np.float32) for s in shape)
    w = (i[:, None, None, None] * a[:3, 0] + j[None, :, None, None] * a[:3, 1]
         + k[None, None, :, None] * a[:3, 2] + a[:3, 3])
    return w.reshape(-1, 3)


def _choose_sequences(plan: StudyPlan, rng: np.random.Generator) -> list[str]:
    if plan.modality == "CT":
        return ["CT"]
    chosen = [s for s, p in plan.protocol.items() if rng.random() < p]
    if not chosen:
        chosen = [max(plan.protocol, key=plan.protocol.get)]
    if plan.shuffle:
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    return chosen


_PROTOCOL_NAMES = {"T1": "t1_se_ax", "T2": "t2_tse_ax", "FLAIR": "t2_flair_ax", "T1C": "t1_se_ax_post_gd", "CT": "ct_head"}


def _scan_name(naming: str, sequence: str, series: int, slice_mm: float) -> str:
    if naming == "protocol":
        return _PROTOCOL_NAMES[sequence]
    if naming == "dicom":
        return f"series_{series:03d}_head_{slice_mm:g}mm".replace(".", "p")
    return f"s{series:02d}_{sequence.lower()}" if sequence != "CT" else f"s{series:02d}_ct_head_{slice_mm:g}mm".replace(".", "p")


def _render_grid(atlas: HeadAtlas, transform: SubjectTransform, findings: list[Finding], widths: tuple[float, float],
                 shape: tuple[int, int, int], affine: np.ndarray, texture_seed: int) -> tuple[Composition, np.ndarray, np.ndarray]:
    world = grid_points(shape, affine)
    q = transform(world)
    comp = compose(atlas, q, findings, *widths)
    texture = smooth_field(q, np.random.default_rng(texture_seed), (12.0, 40.0), 8)
    return comp, world, texture


def render_study(plan: StudyPlan, atlas: HeadAtlas | None = None) -> RenderedStudy:
    """Render the images, truth and report of one planned study."""
    atlas = atlas or head_atlas()
    rng = np.random.default_rng(list(plan.seed))
    findings = draw_findings(atlas, plan.labels, rng)
    labels = labels_of(findings)
    atrophy = next((f for f in findings if f.name == "atrophy"), None)
    widths = atrophy_widths(atrophy, rng)
    transform = SubjectTransform.random(rng)
    texture_seed = int(rng.integers(2**31))
    sequences = _choose_sequences(plan, rng)
    sc = plan.scanner
    slice_mm = float(sc["slice_mm"])
    shape, affine = acquisition_grid(sc, slice_mm, rng)
    comp, world, texture = _render_grid(atlas, transform, findings, widths, shape, affine, texture_seed)
    first_series = int(rng.integers(2, 5))
    series_numbers = list(range(first_series, first_series + len(sequences) + 1))
    scans: list[Scan] = []
    for seq, series in zip(sequences, series_numbers):
        value = scanner(mix(comp.fractions, seq, texture, sc.get("tweak")), seq, world, sc, rng)
        scans.append(Scan(
            name=_scan_name(plan.naming, seq, series, slice_mm), sequence=seq, modality=plan.modality,
            array=value.reshape(shape).astype(np.float32), affine=affine, slice_mm=slice_mm, series_number=series,
            description=f"{'CT HEAD W/O' if seq == 'CT' else 'MR BRAIN'} {seq if seq != 'CT' else ''} {slice_mm:g}mm".replace("  ", " "),
        ))
    if plan.modality == "CT" and rng.random() < plan.second_recon:
        # Same table position and field of view, reconstructed from the same raw data at thin slices.
        thin_shape = (shape[0], shape[1], int(np.ceil(shape[2] * slice_mm / THIN_SLICE_MM)))
        thin_affine = affine.copy()
        thin_affine[2, 2] = THIN_SLICE_MM
        thin_affine[2, 3] = affine[2, 3] - (slice_mm - THIN_SLICE_MM) / 2.0
        thin_comp, thin_world, thin_tex = _render_grid(atlas, transform, findings, widths, thin_shape, thin_affine, texture_seed)
        value = scanner(mix(thin_comp.fractions, "CT", thin_tex), "CT", thin_world, {**sc, "slice_mm": THIN_SLICE_MM}, rng)
        series = series_numbers[len(sequences)]
        scans.append(Scan(
            name=_scan_name(plan.naming, "CT", series, THIN_SLICE_MM), sequence="CT", modality="CT",
            array=value.reshape(thin_shape).astype(np.float32), affine=thin_affine, slice_mm=THIN_SLICE_MM,
            series_number=series, description=f"CT HEAD W/O {THIN_SLICE_MM:g}mm",
        ))
    report = write_report(findings, plan.modality, [s for s in sequences if s != "CT"], plan.style, rng, slice_mm)
    return RenderedStudy(plan=plan, findings=findings, labels=labels, scans=scans, report=report,
                         ventricle_mm=widths[0], sulcal_mm=widths[1], composition=comp,
                         grid_shape=shape, grid_affine=affine)
