"""``hlip-fed explain``: per-scan maps of the patches that drive a study's similarity to a text."""

from __future__ import annotations

import argparse
import json

from hlip_fed.commands.predict import STUDY_HELP, add_model_args, setup_torch
from hlip_fed.errors import HlipError


def register(subparsers) -> None:
    p = subparsers.add_parser("explain", help="maps of where a study matches a text (gradient x input)",
                              description="Gradient x input of the image-text similarity on the patch "
                              "tokens, mapped back onto each scan and overlaid on axial, coronal and "
                              "sagittal slices through its strongest patch (see hlip_fed/downstream/explain.py for why "
                              "not attention rollout).")
    add_model_args(p)
    p.add_argument("study", metavar="STUDY", help="one study; " + STUDY_HELP)
    p.add_argument("--text", required=True, help='the text to explain, e.g. "an intracranial bleed"')
    p.add_argument("--versus", metavar="TEXT",
                   help='explain the similarity to --text minus that to this text, as a zero-shot choice between '
                   'the two does, e.g. "no intracranial bleed" (recommended: a lone text\'s map is dominated by what '
                   'every report shares)')
    p.add_argument("--out", default="maps.png", help="figure to write (default maps.png)")
    p.add_argument("--nifti", help="also write each scan's map as NIfTI into this folder (the scan's grid and affine)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hlip_fed.downstream.explain import explain_study, plot_maps
    from hlip_fed.downstream.inference import find_studies, load_data_config, load_model

    setup_torch(args)
    studies = find_studies([args.study])
    if len(studies) != 1:
        raise HlipError(f"{args.study}: holds {len(studies)} studies; explain takes one study")
    study = studies[0]
    model, tokenizer = load_model(args.model)
    maps, sim, volumes = explain_study(model, tokenizer, study, args.text, load_data_config(args.config),
                                        versus=args.versus)
    label = args.text if args.versus is None else f"{args.text} (versus {args.versus})"
    plot_maps(maps, volumes, args.out, label, title=study.study_id)
    written = []
    if args.nifti:
        import nibabel as nib
        import numpy as np

        from hlip_fed.data.files import scan_stem

        folder = Path(args.nifti)
        folder.mkdir(parents=True, exist_ok=True)
        for m, vol in zip(maps, volumes):
            path = folder / f"{scan_stem(m.source)}_map.nii.gz"
            nib.save(nib.Nifti1Image(m.volume_map.astype(np.float32), vol.affine), path)
            written.append(str(path))
    out = {"study": study.study_id, "text": args.text, "versus": args.versus, "similarity": sim, "figure": str(args.out), "nifti": written,
           "scans": [{"source": m.source, "peak_patch": list(m.peak_patch), "peak_voxel": list(m.peak_voxel),
                      "peak_world_mm": [round(v, 1) for v in m.peak_world_mm],
                      "score_max": float(m.patch_scores.max()), "score_min": float(m.patch_scores.min())}
                     for m in maps]}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    what = f"cosine similarity to {args.text!r}" + (f" minus that to {args.versus!r}" if args.versus else "")
    print(f"study {study.study_id}: {what} = {sim:+.3f}")
    for s in out["scans"]:
        x, y, z = s["peak_world_mm"]
        print(f"  {Path(s['source']).name}: strongest patch {tuple(s['peak_patch'])}, peak at voxel "
              f"{tuple(s['peak_voxel'])} = ({x:+.1f}, {y:+.1f}, {z:+.1f}) mm RAS; "
              f"scores {s['score_min']:+.3g} .. {s['score_max']:+.3g}")
    print(f"wrote {args.out}" + (f" and {len(written)} NIfTI map(s) to {args.nifti}" if written else ""))
    return 0
