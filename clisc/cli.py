"""The ``clisc`` command line: ``clisc segment | train | apply | evaluate | models``.

Exit codes: 0 success, 1 internal error, 2 bad input or an environment that cannot run CLISC (the message
says what was wrong and what to do), 130 cancelled (Ctrl-C; nothing is written, but `train` keeps its finished
stages for --resume).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from . import __version__
from .environment import check_environment
from .errors import Cancelled, InputError
from .models.commands import add_models_command
from .profiles import PROFILES, PROMPT_TYPES
from .server.command import add_command as add_serve_command

logger = logging.getLogger("clisc")


def _check_outputs(source: str, outputs: List[Optional[str]], overwrite: bool) -> None:
    """Refuse, before any work, outputs that would overwrite the input, an existing file without --overwrite,
    a folder, or a place that cannot be written."""
    for path in (Path(p) for p in outputs if p):
        if path.resolve() == Path(source).resolve():
            raise InputError(f"{path}: the output would overwrite the input; choose another name")
        if path.is_dir():
            raise InputError(f"{path} is a folder; give a file name")
        if path.exists() and not overwrite:
            raise InputError(f"{path} exists; choose another name or pass --overwrite")
        if not path.parent.is_dir():
            raise InputError(f"{path}: the folder {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK):
            raise InputError(f"{path}: the folder {path.parent} is not writable")


def _check_suffix(path: Optional[str], suffixes: tuple, what: str) -> None:
    if path and (not str(path).lower().endswith(suffixes) or str(path).lower().endswith(".seg.nrrd")):
        raise InputError(f"{path}: {what} must end with one of {', '.join(suffixes)}")


def _dicom_seg_targets(args: argparse.Namespace) -> List[str]:
    """The DICOM SEG files to write: OUT when it ends with .dcm, and DIR/clisc_seg.dcm for --dicom-seg DIR
    (DIR is created when its parent exists). Refused before any work unless the input is a DICOM series folder."""
    from .dicom_seg import DICOM_SEG_SUFFIX, SEG_FILE_NAME, require_highdicom

    targets = [args.output] if str(args.output).lower().endswith(DICOM_SEG_SUFFIX) else []
    if args.dicom_seg:
        folder = Path(args.dicom_seg)
        if folder.exists() and not folder.is_dir():
            raise InputError(f"--dicom-seg {folder}: not a folder; give the folder to write {SEG_FILE_NAME} in")
        targets.append(str(folder / SEG_FILE_NAME))
    if targets and not Path(args.input).is_dir():
        raise InputError(f"{', '.join(targets)}: a DICOM SEG references the DICOM series it was drawn on, and "
                         f"{args.input} is not a DICOM series folder; write a .seg.nrrd or a labelmap instead")
    if targets:
        require_highdicom()  # an optional dependency: missing, it is named before any work
    if args.dicom_seg and Path(args.dicom_seg).parent.is_dir():
        Path(args.dicom_seg).mkdir(exist_ok=True)
    return targets


def _write_outputs(args: argparse.Namespace, targets: List[str], masks, names, volume) -> None:
    """-o OUT (a .seg.nrrd, a labelmap or a DICOM SEG) and every --dicom-seg file."""
    from .dicom_seg import write_dicom_seg
    from .writers import write_masks

    if args.output not in targets:
        write_masks(args.output, masks, names, volume)
    for target in targets:
        write_dicom_seg(target, masks, names, volume, args.input, getattr(args, "series", None), prompts=names)
        if target != args.output:
            print(f"wrote {target}")


def _segment(args: argparse.Namespace) -> None:
    import json

    from .models.loaders import describe_model
    from .progress import TqdmProgress
    from .readers import read_volume
    from .writers import VOLUME_SUFFIXES, output_kind, write_bytes, write_volume
    from .zeroshot import ZeroShotSegmenter, check_options, check_prompts, preset_options

    prompts = check_prompts(args.prompt)
    dicom_seg = _dicom_seg_targets(args)
    if args.output not in dicom_seg:
        output_kind(args.output)
    _check_suffix(args.saliency_out, VOLUME_SUFFIXES, "--saliency-out (a volume file)")
    _check_suffix(args.report, (".json",), "--report")
    _check_outputs(args.input, list(dict.fromkeys([args.output, *dicom_seg, args.saliency_out, args.report])),
                   args.overwrite)
    options = preset_options(
        args.preset, clip=args.clip, sam=args.sam, saliency=args.saliency, profile=args.profile, beta=args.beta,
        components=args.components, box_per_component=args.box_per_component, keep_3d=args.keep_3d,
        prompt_type=args.prompt_type, relevance_threshold=args.relevance_threshold,
        relevance_smoothing=args.relevance_smoothing, axis=args.axis, device=args.device, slices=args.slices,
        seed=args.seed, mode=args.mode, runtime=args.runtime,
        negative_prompts=tuple(check_prompts(args.negative_prompt)) if args.negative_prompt else None)
    volume = read_volume(args.input, series_uid=args.series)
    check_options(volume, options)
    _prepare_models(args, [(options.clip, "clip"), (options.sam, "sam")])
    segmenter = ZeroShotSegmenter(options)
    if segmenter.device.type == "cpu":
        logger.warning(CPU_WARNINGS["fast every-slice" if args.preset == "fast" and options.mode != "seeded"
                                    else args.preset])
    progress = TqdmProgress()
    try:
        result = segmenter.segment(volume, prompts, progress=progress)
    finally:
        progress.close()
    _write_outputs(args, dicom_seg, result.masks, result.names, volume)
    if args.saliency_out:
        for n, saliency in enumerate(result.saliency):
            write_volume(_numbered(Path(args.saliency_out), n, len(result.saliency)), volume, saliency)
    if args.report:
        report = dict(result.report, models={"clip": describe_model(options.clip, "clip"),
                                             "sam": describe_model(options.sam, "sam")})
        write_bytes(args.report, json.dumps(report, indent=1).encode())
    for name, mask in zip(result.names, result.masks):
        print(f"{name}: {int(mask.sum())} voxels")
    print(f"wrote {args.output}")


CPU_WARNINGS = {  # no figure: the time depends on the CPU, the volume and how many slices show the target
    "accurate": "running on the CPU, which is slow for this method: --preset fast is quicker, a CUDA GPU much "
                "quicker (README: Accuracy and speed)",
    "fast": "running on the CPU: --preset fast is made for it (M2IB on a few seed slices, SAM propagation between "
            "them), a CUDA GPU is still much quicker (README: Accuracy and speed)",
    "fast every-slice": "running on the CPU, which is slow for this method even with --preset fast (--mode "
                        "every-slice: M2IB on every selected slice): a CUDA GPU is much quicker (README: Accuracy and "
                        "speed)",
}


def _prepare_models(args: argparse.Namespace, models: list) -> None:
    """Check the (spec, family) models and download the missing ones, with a progress bar (`models.first_use`)."""
    from .models.first_use import prepare_models
    from .progress import TqdmProgress

    progress = TqdmProgress()
    try:
        prepare_models(models, "--no-download was given" if args.no_download else None, progress)
    finally:
        progress.close()


def _numbered(path, index: int, count: int):
    """``path`` for one of ``count`` files: the first keeps the name, the others get ``_2``, ``_3``..."""
    if count == 1 or index == 0:
        return path
    name = path.name
    suffix = next((s for s in (".nii.gz", ".seg.nrrd") if name.endswith(s)), path.suffix)
    return path.with_name(f"{name[:-len(suffix)]}_{index + 1}{suffix}")


def _train(args: argparse.Namespace) -> None:
    import json

    from .cohort.evaluation import summary_lines
    from .cohort.options import CohortOptions
    from .cohort.run import run_cohort
    from .progress import TqdmProgress

    options = CohortOptions(**{name: value for name, value in vars(args).items()
                               if name in CohortOptions.__dataclass_fields__ and value is not None})
    if args.classifier_weights == "none":
        options.classifier_weights = None
    events = (lambda event: print(json.dumps(event), flush=True)) if args.json_progress else None
    progress = TqdmProgress(disable=args.json_progress)
    try:
        summary = run_cohort(args.cohort, args.prompt, args.out, options, progress=progress, events=events,
                             resume=args.resume, download=not args.no_download)
    finally:
        progress.close()
    if args.json_progress:
        print(json.dumps({"stage": "finished", **summary}), flush=True)
    else:
        print("\n".join(summary_lines(summary)))


def _apply(args: argparse.Namespace) -> None:
    from .cohort.apply import apply_run
    from .progress import TqdmProgress
    from .readers import read_volume
    from .writers import output_kind

    dicom_seg = _dicom_seg_targets(args)
    if args.output not in dicom_seg:
        output_kind(args.output)
    _check_outputs(args.input, list(dict.fromkeys([args.output, *dicom_seg])), args.overwrite)
    volume = read_volume(args.input)
    progress = TqdmProgress()
    try:
        result = apply_run(args.run_dir, volume, args.device, progress=progress)
    finally:
        progress.close()
    _write_outputs(args, dicom_seg, result.masks, result.names, volume)
    print(f"{result.names[0]}: {int(result.masks[0].sum())} voxels")
    print(f"wrote {args.output}")


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluate import (check_matplotlib, format_report, image_paths, match_cases, montage_png, report_csv,
                           report_json, score)
    from .progress import TqdmProgress
    from .writers import write_bytes

    _check_suffix(args.json, (".json",), "--json")
    _check_suffix(args.csv, (".csv",), "--csv")
    _check_suffix(args.montage, (".png",), "--montage")
    _check_outputs(args.prediction, [args.json, args.csv, args.montage], args.overwrite)
    if args.montage:
        check_matplotlib()
    elif args.images:
        raise InputError("--images is the background of the montage: give --montage FILE.png too")
    if args.label is not None and args.label < 1:
        raise InputError(f"--label {args.label}: give a label value of 1 or more (0 is the background)")
    evaluation = match_cases(Path(args.prediction), Path(args.labels), args.cases and Path(args.cases),
                             args.label, args.segment)
    progress = TqdmProgress()
    try:
        report = score(evaluation, args.nsd_tolerance, progress=progress)
    finally:
        progress.close()
    print(format_report(report))
    for path, text in ((args.json, report_json(report)), (args.csv, report_csv(report))):
        if path:
            write_bytes(path, text.encode())
            print(f"wrote {path}")
    if args.montage:
        images = image_paths(args.images and Path(args.images), Path(args.prediction), list(report["cases"]))
        write_bytes(args.montage, montage_png(evaluation, report, images))
        print(f"wrote {args.montage}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clisc", description="Text-prompted, annotation-free segmentation of medical images.")
    parser.add_argument("--version", action="version", version=f"clisc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    segment = commands.add_parser("segment", help="segment a volume or image from text prompts (zero-shot)")
    segment.add_argument("input", help="NIfTI/NRRD/MHA file, DICOM series folder, or PNG/JPG image")
    segment.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                         help="what to segment, e.g. \"brain tumor\" (repeat for several segments)")
    segment.add_argument("-o", "--output", required=True, metavar="OUT",
                         help=".seg.nrrd (one named segment per prompt), a labelmap .nii.gz/.nrrd, or .dcm (a DICOM "
                              "SEG; the input must be a DICOM series)")
    segment.add_argument("--negative-prompt", action="append", metavar="TEXT",
                         help="what the target is not (replaces the default negative ensemble; repeatable)")
    segment.add_argument("--preset", choices=["accurate", "fast"], default="accurate",
                         help="accurate: the papers' defaults in float32 (SAM vit_b); fast: the same M2IB saliency on a few "
                              "seed slices (--mode seeded), CLIP and the SAM image encoder in bfloat16, and LiteMedSAM "
                              "as the SAM (for a CPU)")
    segment.add_argument("--mode", choices=["every-slice", "seeded"],
                         help="every-slice: a saliency map and SAM box on every selected slice (the papers' method); "
                              "seeded: on a few seed slices, SAM propagation between them (a tumour or one organ; "
                              "other targets get every slice). Default: the preset's (accurate every-slice, fast "
                              "seeded)")
    segment.add_argument("--clip", metavar="NAME|DIR", help="CLIP: catalogue name or open_clip folder")
    segment.add_argument("--sam", metavar="NAME|FILE",
                         help="SAM: catalogue name (litemedsam, sam_vit_b, ...) or checkpoint file")
    segment.add_argument("--saliency", choices=["m2ib", "gscorecam", "gradcam"],
                         help="the saliency method (default the preset's, m2ib); gradcam is the quick one (one forward "
                              "and backward pass, the weakest maps), gscorecam the slowest (300 masked passes, about "
                              "12-18x M2IB's time on a CPU)")
    segment.add_argument("--profile", default="auto", metavar="auto|" + "|".join(PROFILES),
                         help="the target's method settings: " + "; ".join(f"{p.name}: {p.description}"
                                                                           for p in PROFILES.values())
                              + " (default auto: from each prompt's words; the report says which and why)")
    segment.add_argument("--beta", type=float, metavar="B",
                         help="M2IB's β (default: 2 when the prompt names the brain, else 1)")
    segment.add_argument("--components", type=int, metavar="K", help="components kept per slice (and in 3D)")
    segment.add_argument("--box-per-component", action=argparse.BooleanOptionalAction,
                         help="one SAM box per component (paired organs) or one around all")
    segment.add_argument("--keep-3d", metavar="largest|all|MM3",
                         help="3D components kept: the K largest, all, or those of at least MM3 mm³")
    segment.add_argument("--prompt-type", choices=list(PROMPT_TYPES), help="SAM's prompt (profile: box)")
    segment.add_argument("--relevance-threshold", type=float, metavar="F",
                         help="--slices auto: smoothed CLIP relevance a slice needs (default 0.5)")
    segment.add_argument("--relevance-smoothing", type=int, metavar="N",
                         help="--slices auto: slices in the moving average of relevance (default 5)")
    segment.add_argument("--axis", choices=["auto", "axial", "coronal", "sagittal", "i", "j", "k"],
                         help="slice direction (default: the acquisition axis)")
    segment.add_argument("--slices", metavar="auto|all|FIRST:LAST",
                         help="auto: CLIP decides which slices show the target; all or a range: you decide")
    segment.add_argument("--device", choices=["auto", "cpu", "cuda"])
    segment.add_argument("--saliency-out", metavar="FILE", help="also write the saliency map as a volume")
    segment.add_argument("--report", metavar="FILE.json", help="write what was done, with timings and models")
    segment.add_argument("--seed", type=int)
    segment.add_argument("--runtime", choices=["auto", "torch", "openvino", "onnxruntime"], help="CPU runtime (auto)")
    segment.add_argument("--series", metavar="UID|FILE", help="DICOM series of a folder with several: UID or a file")
    segment.add_argument("--dicom-seg", metavar="DIR",
                         help="also write a DICOM SEG (DIR/clisc_seg.dcm) referencing the input DICOM series")
    segment.add_argument("--overwrite", action="store_true", help="replace existing output files")
    segment.add_argument("--no-download", action="store_true",
                         help="never download a missing model: list every missing one with how to get it")
    segment.set_defaults(run=_segment)
    train = commands.add_parser(
        "train", help="pseudo-label a cohort and self-train a 3D U-Net (CLISC); runs under torchrun too")
    train.add_argument("cohort", help="folder of volumes, folder of DICOM series folders, or CSV/text list of paths")
    train.add_argument("--prompt", required=True, metavar="TEXT", help="the target, e.g. \"brain tumor\"")
    train.add_argument("--out", required=True, metavar="RUN_DIR", help="folder for every stage's output")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run in RUN_DIR")
    train.add_argument("--labels", metavar="DIR_OR_CSV",
                       help="evaluation only (never used for training): folder of CASE_ID.nii.gz labelmaps or a "
                            "CSV with columns case_id,label; foreground = label > 0")
    train.add_argument("--holdout-split", metavar="FILE",
                       help=".txt (one case id per line) or .csv (column case_id) of cases kept out of every "
                            "stage; the final U-Net predicts them, scored apart in metrics.json with --labels")
    train.add_argument("--normal-prompt", metavar="TEXT", help="CLIP's 'normal slice' text (default: derived)")
    train.add_argument("--abnormal-prompt", metavar="TEXT", help="CLIP's 'abnormal slice' text (default: derived)")
    train.add_argument("--clip", metavar="NAME|DIR", help="CLIP (default clip_vit_b32, the paper's)")
    train.add_argument("--sam", metavar="NAME|FILE", help="SAM (default sam_vit_b)")
    train.add_argument("--classifier", choices=["auto", "resnet50", "efficientnet-lite0"],
                       help="slice classifier backbone (default auto: resnet50 when its ImageNet weights are "
                            "installed, else efficientnet-lite0, whose ImageNet weights ship with CLISC)")
    train.add_argument("--classifier-weights", metavar="NAME|FILE|none",
                       help="classifier start weights (default: the backbone's ImageNet weights; none: random)")
    train.add_argument("--clip-threshold", type=float, metavar="F",
                       help="CLIP confidence to label a slice (default 0.6)")
    train.add_argument("--classifier-epochs", type=int, metavar="N", help="slice classifier epochs (default 20)")
    train.add_argument("--classifier-image-size", type=int, metavar="N",
                       help="classifier input side in pixels (default 224)")
    train.add_argument("--classifier-batch-size", type=int, metavar="N", help="classifier batch (default 8)")
    train.add_argument("--cam-threshold", choices=["otsu", "kmeans"], help="label-free CAM binarisation")
    train.add_argument("--unet-epochs", type=int, metavar="N", help="U-Net epochs per round (default 400)")
    train.add_argument("--patch-size", type=int, metavar="N", help="U-Net patch side, a multiple of 16 (default 128)")
    train.add_argument("--batch-size", type=int, metavar="N", help="U-Net patches per step, per process (default 2)")
    train.add_argument("--loader-workers", type=int, metavar="N",
                       help="processes reading cases and cutting U-Net patches ahead of training (default 2; 0: none)")
    train.add_argument("--s3f-rounds", type=int, metavar="N", help="S3F self-training rounds (default 1; 0: none)")
    train.add_argument("--s3f-keep", type=float, metavar="F", help="fraction of cases S3F keeps (default 0.8)")
    train.add_argument("--sam-precision", choices=["float32", "bfloat16", "float16"])
    train.add_argument("--stop-after", choices=["pseudo_labels"],
                       help="stop once the pseudo-labels are written (--resume later to train the U-Net)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"])
    train.add_argument("--seed", type=int)
    train.add_argument("--json-progress", action="store_true",
                       help="print progress as one JSON object per line on stdout instead of progress bars")
    train.add_argument("--no-download", action="store_true",
                       help="never download a missing model: list every missing one with how to get it")
    train.set_defaults(run=_train)
    apply = commands.add_parser("apply", help="segment a volume with a trained CLISC run")
    apply.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a finished `clisc train`")
    apply.add_argument("input", help="NIfTI/NRRD/MHA file or DICOM series folder")
    apply.add_argument("-o", "--output", required=True, metavar="OUT",
                       help=".seg.nrrd, labelmap .nii.gz/.nrrd, or .dcm (a DICOM SEG; the input must be a DICOM series)")
    apply.add_argument("--dicom-seg", metavar="DIR",
                       help="also write a DICOM SEG (DIR/clisc_seg.dcm) referencing the input DICOM series")
    apply.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    apply.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    apply.set_defaults(run=_apply)

    evaluate = commands.add_parser(
        "evaluate", help="score predictions against ground-truth labels (Dice, HD95 mm, NSD)")
    evaluate.add_argument("prediction", metavar="PREDICTION_OR_RUN_DIR",
                          help="a labelmap or .seg.nrrd, a folder of CASE_ID.nii.gz/.seg.nrrd files, or the --out "
                               "folder of `clisc train` (its predictions/)")
    evaluate.add_argument("labels", metavar="LABELS",
                          help="a labelmap (for one prediction), a folder of CASE_ID.nii.gz labelmaps, or a CSV "
                               "with columns case_id,label")
    evaluate.add_argument("--label", type=int, metavar="N", help="score label value N only (default: label > 0)")
    evaluate.add_argument("--segment", metavar="NAME",
                          help="score this segment of .seg.nrrd predictions (default: any segment)")
    evaluate.add_argument("--cases", metavar="FILE",
                          help="text or CSV list of the case ids to score (e.g. the --holdout-split file of "
                               "`clisc train`)")
    evaluate.add_argument("--nsd-tolerance", type=float, default=2.0, metavar="MM",
                          help="surface distance counted as correct by NSD, in mm (default 2)")
    evaluate.add_argument("--json", metavar="FILE.json", help="write every score and the summary as JSON")
    evaluate.add_argument("--csv", metavar="FILE.csv", help="write the per-case scores as CSV")
    evaluate.add_argument("--montage", metavar="FILE.png",
                          help="write a PNG of the worst and best cases' slices with both contours (needs matplotlib)")
    evaluate.add_argument("--images", metavar="FILE_OR_COHORT",
                          help="the montage's images: a volume, or a folder or CSV/text list of CASE_ID volumes "
                               "(default for a RUN_DIR: its cohort; else a black background)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace existing output files")
    evaluate.set_defaults(run=_evaluate)

    add_models_command(commands)
    add_serve_command(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s: %(message)s")
    try:
        check_environment()
        args.run(args)
    except InputError as error:
        print(f"clisc: error: {error}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        if args.command == "train":
            print(f"clisc: cancelled; {args.out} keeps every finished stage and case. Run the same command with "
                  "--resume to continue from there.", file=sys.stderr)
        else:
            print("clisc: cancelled; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
