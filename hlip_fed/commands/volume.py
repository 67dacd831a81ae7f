"""``hlip-fed volume``: inspect one scan, or convert it to NIfTI exactly as the reader read it."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("volume", help="inspect or convert one scan (NIfTI, DICOM file or series)")
    sub = parser.add_subparsers(dest="volume_command", required=True, metavar="SUBCOMMAND")

    info = sub.add_parser("info", help="shape, spacing, orientation, modality and intensity range")
    info.add_argument("path", help="NIfTI file, DICOM file, DICOM series folder or DICOMDIR")
    info.add_argument("--series", help="SeriesInstanceUID to pick from a folder holding several")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_info)

    convert = sub.add_parser("convert", help="write the scan as NIfTI (raw intensities, world affine)")
    convert.add_argument("path", help="NIfTI file, DICOM file, DICOM series folder or DICOMDIR")
    convert.add_argument("out", help="output .nii or .nii.gz")
    convert.add_argument("--series", help="SeriesInstanceUID to pick from a folder holding several")
    convert.set_defaults(func=_convert)


def _read(args: argparse.Namespace):
    import logging
    import warnings

    from hlip_fed.data.readers import read_scan

    logging.getLogger("pydicom").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reader reports what matters as DataError or warnings
        return read_scan(args.path, allow_2d=True, series_uid=args.series)


def _info(args: argparse.Namespace) -> int:
    volume = _read(args)
    summary = volume.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    lo, hi = summary["intensity"]["min"], summary["intensity"]["max"]
    print(f"source:      {summary['source']}")
    print(f"format:      {summary.get('format', '?')}")
    print(f"shape:       {' x '.join(map(str, summary['shape']))} (D x H x W, canonical)")
    print(f"spacing:     {' x '.join(f'{s:g}' for s in summary['spacing'])} mm")
    print(f"orientation: {summary['orientation']} (stored as {summary.get('source_orientation', '?')})")
    print(f"modality:    {summary['modality']}" + (f" ({summary['sequence']})" if summary["sequence"] else ""))
    print(f"intensity:   {lo:g} .. {hi:g} (mean {summary['intensity']['mean']:.4g})")
    for w in summary["warnings"]:
        print(f"warning:     {w}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from hlip_fed.data.nifti import write_nifti

    volume = _read(args)
    write_nifti(volume, args.out)
    print(f"wrote {args.out}: {' x '.join(map(str, volume.shape))} {volume.orientation} {volume.modality}")
    return 0
