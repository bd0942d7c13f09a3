"""The layout of a cohort run folder: the one place that spells its paths.

RUN_DIR after a run::

    config.json                 every option, the prompt, the cohort, the prompts used, the package version, the
                                deviations from the paper and its released code
    run.log                     the log (one per rank under torchrun: run.rank1.log, ...)
    skipped/CASE.json           cases that could not be loaded or processed, with the stage and the reason
    preprocessed/CASE/          the case cropped to the body and z-scored, read lazily (`case_store`)
    slice_labels/CASE.json      CLIP's per-slice labels (1 abnormal, 0 normal, -1 unsure)
    classifier/classifier.pt    the slice classifier; classifier_amda.pt after AMDA retraining
    cams/CASE.npz, cams_amda/CASE.npz   LayerCAM maps (float16), their masks, the positive slices
                                (on the pre-processed grid: the input cropped to the body's bounding box)
    pseudo_labels/CASE.nii.gz   SAM pseudo-labels (inside the body), aligned with the input volume
    unet/roundR/last.pt         U-Net checkpoint after each epoch of round R (0: pseudo-labels; R>0: S3F)
    unet/roundR/labels/CASE.npy the labels round R trains on, on the pre-processed grid (bool)
    s3f/roundR.csv              S3F similarity table; s3f/roundR/CASE.npz the per-case S and similarity
    unet/final.pt               the U-Net `clisc apply` uses
    predictions/CASE.nii.gz     the final U-Net's segmentation of each held-out case, and with --labels of
                                every training case too
    metrics.json                with --labels only: the final U-Net's scores, in two sections: "training_cohort"
                                (the cases it was trained on) and "held_out" (with --holdout-split)
    losses.json, loss_curves.png, summary.json
    done/STEP                   written when a step has finished

Every file is written to a temporary name and renamed (`clisc.writers.atomic_path`), so a kill never leaves
half a file under a final name; `remove_partial_files` clears what a killed writer left.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..writers import PARTIAL_MARK, atomic_path, remove_partial_files, write_bytes

FOLDERS = ("done", "skipped", "preprocessed", "slice_labels", "classifier", "cams", "cams_amda", "pseudo_labels", "unet", "s3f",
           "predictions")
RESULTS = {"pseudo_label": "pseudo_labels", "prediction": "predictions"}  # per-case labelmaps, by kind


class RunFolder:
    """A cohort run folder (see the module docstring): paths, done markers, skipped cases, atomic writes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ---- the run as a whole

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def final_model(self) -> Path:
        return self.path / "unet" / "final.pt"

    def is_run(self) -> bool:
        return self.config_file.is_file()

    def is_finished(self) -> bool:
        """Whether the run has its final U-Net (`clisc apply` can use it)."""
        return self.is_run() and self.final_model.is_file()

    def config(self) -> dict:
        """config.json; InputError when the folder holds no run."""
        if not self.is_run():
            raise InputError(f"{self.path}: not a CLISC run folder (no config.json); run `clisc train` first")
        return json.loads(self.config_file.read_text())

    def require_finished(self) -> dict:
        """config.json of a finished run; InputError saying how to finish it otherwise."""
        if not self.is_finished():
            raise InputError(f"{self.path}: not a finished CLISC run (no unet/final.pt or config.json); run `clisc "
                             "train` to the end first (with --resume to finish an interrupted run)")
        return self.config()

    def held_out_cases(self) -> list[str]:
        """The case ids the run kept out of every stage (its --holdout-split)."""
        return list(self.config().get("held_out_cases", []))

    def cases(self) -> dict[str, Path]:
        """{case id: input file or DICOM folder} of the run's cohort, as the engine lists it."""
        from .cases import list_cohort

        return {case.case_id: case.path for case in list_cohort(self.config()["cohort"])}

    def create(self) -> None:
        for folder in FOLDERS:
            (self.path / folder).mkdir(parents=True, exist_ok=True)

    def remove_partial_files(self) -> list[Path]:
        return remove_partial_files(self.path)

    # ---- per-step and per-case paths

    def log_file(self, rank: int) -> Path:
        return self.path / ("run.log" if rank == 0 else f"run.rank{rank}.log")

    def preprocessed(self, case_id: str) -> Path:
        """The folder of a pre-processed case (`clisc.cohort.case_store`)."""
        return self.path / "preprocessed" / case_id

    def slice_labels(self, case_id: str) -> Path:
        return self.path / "slice_labels" / f"{case_id}.json"

    def classifier(self, amda: bool) -> Path:
        return self.path / "classifier" / ("classifier_amda.pt" if amda else "classifier.pt")

    def classifier_slices(self, amda: bool) -> Path:
        """The classifier's training slices while it trains (a scratch file, removed after; named as a partial
        file so that a killed run's copy is removed on resumption)."""
        return self.path / "classifier" / f".{'amda' if amda else 'plain'}_slices{PARTIAL_MARK}.u8"

    def cams(self, case_id: str, amda: bool) -> Path:
        return self.path / ("cams_amda" if amda else "cams") / f"{case_id}.npz"

    def result(self, case_id: str, kind: str) -> Path:
        """A case's labelmap of ``kind`` (`RESULTS`: pseudo_label or prediction), on the input's grid."""
        if kind not in RESULTS:
            raise InputError(f"result {kind!r}: use one of {', '.join(RESULTS)}")
        return self.path / RESULTS[kind] / f"{case_id}.nii.gz"

    def pseudo_label(self, case_id: str) -> Path:
        return self.result(case_id, "pseudo_label")

    def prediction(self, case_id: str) -> Path:
        return self.result(case_id, "prediction")

    @property
    def predictions(self) -> Path:
        """The folder of the final U-Net's predictions (CASE.nii.gz)."""
        return self.path / RESULTS["prediction"]

    def unet_round(self, round_: int) -> Path:
        """The folder of U-Net round ``round_`` (its ``last.pt`` is the checkpoint after each epoch)."""
        return self.path / "unet" / f"round{round_}"

    def unet_label(self, round_: int, case_id: str) -> Path:
        """The label U-Net round ``round_`` trains on for a case (K', J', I') bool, on the pre-processed grid."""
        return self.unet_round(round_) / "labels" / f"{case_id}.npy"

    def s3f_table(self, round_: int) -> Path:
        return self.path / "s3f" / f"round{round_}.csv"

    def s3f_case(self, round_: int, case_id: str) -> Path:
        return self.path / "s3f" / f"round{round_}" / f"{case_id}.npz"

    def file(self, name: str) -> Path:
        """A file at the top of the run: metrics.json, losses.json, loss_curves.png, summary.json."""
        return self.path / name

    # ---- done markers and skipped cases

    def is_done(self, step: str) -> bool:
        return (self.path / "done" / step).is_file()

    def mark_done(self, step: str) -> None:
        write_bytes(self.path / "done" / step, b"")

    def skip(self, case_id: str, case_path: Path, stage: str, reason: str) -> None:
        self.write_json(self.path / "skipped" / f"{case_id}.json",
                        {"case_id": case_id, "path": str(case_path), "stage": stage, "reason": reason})

    def skipped(self) -> dict:
        """{case_id: record} of the cases skipped so far."""
        return {path.stem: json.loads(path.read_text()) for path in sorted((self.path / "skipped").glob("*.json"))}

    # ---- atomic writes

    @staticmethod
    def write_json(path: Path, value) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, json.dumps(value, indent=1).encode())

    @staticmethod
    def write_npy(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            np.save(temporary, array)

    @staticmethod
    def write_npz(path: Path, **arrays) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        write_bytes(path, buffer.getvalue())
