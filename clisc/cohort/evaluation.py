"""What a cohort run reports about itself: scores against labels (read here only, after training), the
summary in words, and the loss curves."""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError
from ..metrics import EMPTY_CASE_RULE, NSD_TOLERANCE_MM, evaluate
from ..readers import VOLUME_SUFFIXES, read_volume
from ..writers import write_bytes
from .cases import Case
from .run_folder import RunFolder

logger = logging.getLogger("clisc")

TRAINING_NOTE = ("cases the U-Net was trained on (with its own pseudo-labels; the labels were never used for "
                 "training): not a test of generalisation")
HELD_OUT_NOTE = "cases kept out of every stage (--holdout-split): a test of generalisation"


def label_paths(labels: str | Path, case_ids: Optional[list[str]] = None) -> dict[str, Path]:
    """{case_id: labelmap file} from a folder (files named CASE_ID + a volume suffix) or a CSV with columns
    ``case_id`` and ``label`` (relative paths are relative to the CSV's folder); only ``case_ids`` when given."""
    labels = Path(labels)
    wanted = (lambda case: True) if case_ids is None else (lambda case: case in case_ids)
    if labels.is_dir():
        found = {}
        for path in labels.iterdir():
            for suffix in VOLUME_SUFFIXES:
                if path.name.endswith(suffix) and wanted(path.name[:-len(suffix)]):
                    found[path.name[:-len(suffix)]] = path
        return found
    if labels.suffix.lower() == ".csv" and labels.is_file():
        with open(labels, newline="", encoding="utf-8-sig") as file:
            rows = list(csv.DictReader(file))
        if not rows or not {"case_id", "label"} <= set(rows[0]):
            raise InputError(f"{labels}: a labels CSV needs the columns case_id and label")
        return {row["case_id"]: labels.parent / row["label"] for row in rows if wanted(row["case_id"])}
    raise InputError(f"--labels {labels}: give a folder of CASE_ID.nii.gz files or a CSV with columns case_id,label")


def run_metrics(folder: RunFolder, labels: str, holdout_split: Optional[str], training: list[Case],
                held_out: list[Case], shapes: dict[str, tuple]) -> dict:
    """metrics.json's content: the final U-Net's predictions (``folder``'s predictions/) scored on the training
    cohort and, apart, on the held-out cases. ``shapes``: {case_id: (K, J, I)} of the cases that could be
    loaded."""
    metrics = {"empty_case_rule": EMPTY_CASE_RULE, "foreground": "label > 0", "nsd_tolerance_mm": NSD_TOLERANCE_MM,
               "labels": str(labels), "holdout_split": holdout_split, "model": "unet/final.pt",
               "training_cohort": _section(folder, labels, training, shapes, TRAINING_NOTE)}
    if held_out:
        metrics["held_out"] = _section(folder, labels, held_out, shapes, HELD_OUT_NOTE)
    return metrics


def _section(folder: RunFolder, labels: str, cases: list[Case], shapes: dict, note: str) -> dict:
    """The scores of each of ``cases``, the reason each other one is not scored, and the mean and median Dice
    and the mean HD95."""
    label_files = label_paths(labels, [case.case_id for case in cases])
    section = {"note": note, "cases": {}, "not_evaluated": {}}
    for case in cases:
        result = _score(folder, case.case_id, shapes.get(case.case_id), label_files.get(case.case_id))
        section["cases" if isinstance(result, dict) else "not_evaluated"][case.case_id] = result
    dice = [scores["dice"] for scores in section["cases"].values()]
    if dice:
        section.update(mean_dice=float(np.mean(dice)), median_dice=float(np.median(dice)),
                       mean_hd95_mm=float(np.mean([s["hd95_mm"] for s in section["cases"].values()])))
    return section


def _score(folder: RunFolder, case_id: str, shape: Optional[tuple], label_file: Optional[Path]) -> dict | str:
    """`clisc.metrics.evaluate` of one case's prediction, or why it cannot be scored."""
    if shape is None:
        return "could not be loaded"
    if label_file is None:
        return "no label file"
    truth = read_volume(label_file)
    if truth.array.shape != tuple(shape):
        return f"label shape {truth.array.shape} differs from the image's"
    prediction = read_volume(folder.prediction(case_id)).array > 0
    return evaluate(prediction, truth.array > 0, truth.spacing[::-1])


def empty_pseudo_labels(folder: RunFolder, case_ids: list[str]) -> dict[str, str]:
    """{case_id: why its pseudo-label is empty} of the cases whose pseudo-label has no voxel, each warned about."""
    empty = {}
    for case_id in case_ids:
        if read_volume(folder.pseudo_label(case_id)).array.any():
            continue
        cams = np.load(folder.cams(case_id, amda=True))
        positive, prompted = int(cams["positive"].sum()), int(cams["mask"].any(axis=(1, 2)).sum())
        empty[case_id] = ("the classifier called no slice abnormal" if not positive else
                          f"the CAM mask is empty on the {positive} slice(s) the classifier called abnormal"
                          if not prompted else f"SAM's masks were empty on all {prompted} slice(s) it was prompted on")
        logger.warning("case %s: its pseudo-label is empty (%s)", case_id, empty[case_id])
    return empty


def nothing_to_learn(folder: RunFolder, empty: dict[str, str]) -> str:
    """Why a run whose every pseudo-label is empty (``empty``, as `empty_pseudo_labels` gives) stops, in words."""
    labels = [json.loads(folder.slice_labels(case_id).read_text()) for case_id in empty]
    abnormal, total = sum(case.count(1) for case in labels), sum(len(case) for case in labels)
    return (f"every pseudo-label is empty ({len(empty)} case(s)), so the U-Net has nothing to learn from and was "
            f"not trained. CLIP labelled {abnormal} of {total} slices abnormal; per case: "
            + "; ".join(f"{case}: {why}" for case, why in empty.items()) + ".")


def what_to_try(options, run_dir: Path) -> str:
    """The options (`CohortOptions`) that can give a run something to learn, by their flags."""
    return (f"Try, in a new --out folder: a lower --clip-threshold (now {options.clip_threshold}) or other "
            "--normal-prompt/--abnormal-prompt texts (CLIP decides which slices the classifier learns as abnormal), "
            f"more --classifier-epochs (now {options.classifier_epochs}), --cam-threshold "
            f"{'kmeans' if options.cam_threshold == 'otsu' else 'otsu'}, or an ImageNet classifier (--classifier "
            f"efficientnet-lite0 needs no download; this run: {options.classifier} from "
            f"{options.classifier_weights or 'random weights'}). Every stage's output is in {run_dir}.")


def means(section: dict) -> dict:
    """The number of cases scored and the means of a section of metrics.json, for the summary."""
    return {"scored": len(section["cases"]),
            **{key: section[key] for key in ("mean_dice", "median_dice", "mean_hd95_mm") if key in section}}


def summary_lines(summary: dict) -> list[str]:
    """A run's summary in words (`clisc train` prints it, CLISCTrain logs it), each mean with its cohort."""
    held_out = summary.get("held_out", {})
    training = summary["cases"] - len(held_out.get("cases", []))
    lines = [f"{summary['loaded']} of {training} training case(s) loaded, {len(summary['skipped'])} skipped"
             + (f", {len(held_out['cases'])} held out" if held_out else "")
             + f"; model: {summary['model'] or 'none yet (stopped after the pseudo-labels)'}"]
    if "training_cohort" in summary:
        lines.append(_scores_line("training cohort (trained on: not a test of generalisation)",
                                  summary["training_cohort"]))
    if "scored" in held_out:
        lines.append(_scores_line("held-out cases", held_out))
    elif "note" in held_out:
        lines.append(f"held-out cases: {held_out['predicted']} predicted in {summary['run_dir']}/predictions, "
                     f"{held_out['note']}")
    if "training_cohort" in summary:
        lines.append(f"per case: {summary['run_dir']}/metrics.json")
    return lines


def _scores_line(title: str, scores: dict) -> str:
    if "mean_dice" not in scores:
        return f"{title}: no case scored (see not_evaluated in metrics.json)"
    return (f"{title}: mean Dice {scores['mean_dice']:.4f} (median {scores['median_dice']:.4f}), mean HD95 "
            f"{scores['mean_hd95_mm']:.2f} mm over {scores['scored']} case(s)")


def run_summary(folder: RunFolder, cases: int, loaded: int, held_out: list[str], held_out_predicted: int,
                empty: dict[str, str], stopped: Optional[str], metrics: Optional[dict]) -> dict:
    """summary.json of a run: case counts, skipped cases, the final model, the empty pseudo-labels, why it
    stopped (if it did), the held-out cases, and with ``metrics`` (from `run_metrics`) the mean scores."""
    model = folder.final_model
    summary = {"run_dir": str(folder.path), "cases": cases, "loaded": loaded, "skipped": folder.skipped(),
               "model": str(model) if model.is_file() else None, "empty_pseudo_labels": empty}
    if stopped:
        summary["stopped"] = stopped
    if metrics is not None:
        summary["training_cohort"] = means(metrics["training_cohort"])
    if held_out:
        summary["held_out"] = {"cases": held_out, "predicted": held_out_predicted}
        if metrics is not None:
            summary["held_out"].update(means(metrics["held_out"]))
        elif held_out_predicted:
            summary["held_out"]["note"] = ("not scored: no --labels (`clisc evaluate RUN_DIR LABELS --cases "
                                           "HOLDOUT_FILE` scores them)")
    return summary


def write_final_model(folder: RunFolder, last_round: int) -> None:
    """unet/final.pt (the U-Net of round ``last_round``), losses.json and loss_curves.png of every checkpoint."""
    import torch

    from .unet import save_checkpoint

    rounds = [folder.unet_round(r) / "last.pt" for r in range(last_round + 1)]
    state = torch.load(rounds[-1], map_location="cpu", weights_only=True)
    save_checkpoint(folder.final_model, {"model": state["model"], "round": last_round})
    checkpoints = {"classifier/classifier": folder.classifier(amda=False),
                   "classifier/classifier_amda": folder.classifier(amda=True),
                   **{f"unet/round{r}": path for r, path in enumerate(rounds)}}
    losses = {name: torch.load(path, map_location="cpu", weights_only=True)["losses"]
              for name, path in checkpoints.items()}
    folder.write_json(folder.file("losses.json"), losses)
    plot_losses(losses, folder.file("loss_curves.png"))


def plot_losses(losses: dict[str, list[float]], path: Path) -> None:
    """A PNG of the loss curves (matplotlib when installed; it is not a dependency, so otherwise a log line)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the host application's backend alone
    except ImportError:
        logger.info("matplotlib is not installed: no %s (the losses are in losses.json)", path.name)
        return
    figure = Figure(figsize=(10, 4), layout="tight")
    axes = figure.subplots(1, 2)
    for name, values in losses.items():
        axes[0 if name.startswith("classifier") else 1].plot(range(1, len(values) + 1), values, label=name)
    for axis, title in zip(axes, ("slice classifier (cross-entropy)", "3D U-Net (Dice + cross-entropy)")):
        axis.set(title=title, xlabel="epoch", ylabel="loss")
        axis.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes(path, buffer.getvalue())
