"""The CLISC cohort run (METHOD.md §B): stage by stage, in a run directory that survives a kill.

RUN_DIR after a run::

    config.json                 every option, the prompt, the cohort, the prompts used, the package version, the
                                deviations from the paper and its released code
    run.log                     the log (one per rank under torchrun: run.rank1.log, ...)
    skipped/CASE.json           cases that could not be loaded or processed, with the stage and the reason
    slice_labels/CASE.json      CLIP's per-slice labels (1 abnormal, 0 normal, -1 unsure)
    classifier/classifier.pt    the slice classifier; classifier_amda.pt after AMDA retraining
    cams/CASE.npz, cams_amda/CASE.npz   LayerCAM maps (float16), their masks, the positive slices
                                (on the pre-processed grid: the input cropped to the body's bounding box)
    pseudo_labels/CASE.nii.gz   SAM pseudo-labels (inside the body), aligned with the input volume
    unet/roundR/last.pt         U-Net checkpoint after each epoch of round R (0: pseudo-labels; R>0: S3F)
    s3f/roundR.csv              S3F similarity table; s3f/roundR/CASE.npz the per-case S and similarity
    unet/final.pt               the U-Net `clisc apply` uses
    predictions/CASE.nii.gz     the final U-Net's segmentation of each held-out case, and with --labels of
                                every training case too
    metrics.json                with --labels only: the final U-Net's scores, in two sections: "training_cohort"
                                (the cases it was trained on) and "held_out" (with --holdout-split)
    losses.json, loss_curves.png, summary.json
    done/STEP                   written when a step has finished

Held-out cases (--holdout-split, a list of case ids) take part in no step before the final U-Net: they are
loaded only then, predicted, and scored apart from the training cohort.

Resuming skips finished steps, per-case outputs that exist, and U-Net epochs in the checkpoint. Every file is
written to a temporary name and renamed, so a kill never leaves half a file under a final name. Ground-truth
labels are read only by the evaluation step, after training.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__, deviations
from ..errors import Cancelled, InputError
from ..metrics import EMPTY_CASE_RULE, NSD_TOLERANCE_MM, evaluate
from ..progress import CancelToken, ProgressCallback, no_progress
from ..readers import read_volume
from ..volume import Volume
from ..writers import remove_partial_files, write_bytes, write_labelmap
from ..precision import DTYPES, dtype_of
from ..result import SegmentResult, resolve_device
from . import distributed
from .cases import Case, body_mask, list_cohort, preprocess, read_case_list, to_uint8_slices, uncrop

logger = logging.getLogger("clisc")

LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
# Options that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("device", "labels", "stop_after")
STOP_AFTER = ("pseudo_labels",)
TRAINING_NOTE = ("cases the U-Net was trained on (with its own pseudo-labels; the labels were never used for "
                 "training): not a test of generalisation")
HELD_OUT_NOTE = "cases kept out of every stage (--holdout-split): a test of generalisation"


@dataclass
class CohortOptions:
    """Every parameter of a cohort run (recorded in config.json). Defaults follow the paper where it says."""

    clip: str = "clip_vit_b32"              # the paper's OpenAI ViT-B/32
    sam: str = "sam_vit_b"
    classifier_weights: Optional[str] = "resnet50_imagenet"  # ImageNet ResNet-50 (name or file); None: random
    normal_prompt: Optional[str] = None     # default: derived from the target prompt (slice_labels)
    abnormal_prompt: Optional[str] = None
    clip_threshold: float = 0.6             # a slice is labelled when CLIP's larger probability reaches this
    classifier_epochs: int = 20             # not stated in the paper (StepLR steps every 7 epochs)
    classifier_batch_size: int = 8
    classifier_image_size: int = 224
    cam_threshold: str = "otsu"             # otsu | kmeans: label-free CAM binarisation
    unet_epochs: int = 400
    patch_size: int = 128
    batch_size: int = 2                     # per process under torchrun
    s3f_rounds: int = 1
    s3f_keep: float = 0.8
    labels: Optional[str] = None            # evaluation only: folder or CSV of ground-truth labelmaps
    holdout_split: Optional[str] = None     # .txt/.csv of case ids kept out of training, predicted at the end
    device: str = "auto"
    sam_precision: str = "float32"
    sam_batch_size: int = 2
    seed: int = 0
    stop_after: Optional[str] = None        # "pseudo_labels": stop there (resume later to train)

    def check(self) -> None:
        if not 0 < self.s3f_keep <= 1:
            raise InputError(f"--s3f-keep {self.s3f_keep}: use a fraction in (0, 1]")
        if self.s3f_rounds < 0 or self.unet_epochs < 1 or self.classifier_epochs < 1 or self.batch_size < 1:
            raise InputError("--s3f-rounds must be >= 0; --unet-epochs, --classifier-epochs, --batch-size >= 1")
        if self.cam_threshold not in ("otsu", "kmeans"):
            raise InputError(f"CAM threshold {self.cam_threshold!r}: use otsu or kmeans")
        if self.stop_after not in (None, *STOP_AFTER):
            raise InputError(f"--stop-after {self.stop_after!r}: use one of {', '.join(STOP_AFTER)}")
        dtype_of(self.sam_precision, "SAM")
        from .unet import check_patch_size

        check_patch_size(self.patch_size)


@dataclass
class _Loaded:
    """A pre-processed case: ``image`` (K', J', I') float32 is the input's ``crop``; ``body`` its body voxels
    (`cases.body_mask`); ``slices`` its uint8 axial slices; ``shape``/``ijk_to_ras`` the input's grid."""

    case: Case
    image: np.ndarray
    body: np.ndarray
    slices: np.ndarray
    crop: tuple
    shape: tuple
    ijk_to_ras: np.ndarray

    @property
    def case_id(self) -> str:
        return self.case.case_id

    def reference(self) -> Volume:
        """A volume on the input's grid, for writers."""
        return Volume(np.zeros(self.shape, np.uint8), self.ijk_to_ras, str(self.case.path))


def _write_json(path: Path, value) -> None:
    write_bytes(path, json.dumps(value, indent=1).encode())


def _write_npz(path: Path, **arrays) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def _loss(message: str) -> Optional[float]:
    """The loss in a training progress message ("loss 0.1234"), if any."""
    match = re.search(r"loss ([-+0-9.eE]+)", message)
    return float(match.group(1)) if match else None


class _Reporter:
    """Sends progress to a `ProgressCallback` and, as dicts {stage, case, epoch, loss, done, total}, to an
    ``events`` callback (the CLI's ``--json-progress``). Only rank 0 reports."""

    def __init__(self, progress: ProgressCallback, events: Optional[Callable[[dict], None]]) -> None:
        self.progress = progress
        self.events = events

    def __call__(self, stage: str, done: int, total: int, case: Optional[str] = None, epoch: Optional[int] = None,
                 loss: Optional[float] = None) -> None:
        if not distributed.is_main():
            return
        message = " ".join(part for part in (case, f"loss {loss:.4f}" if loss is not None else None) if part)
        self.progress(stage, done, total, message)
        if self.events is not None:
            self.events({"stage": stage, "case": case, "epoch": epoch, "loss": loss, "done": done, "total": total})

    def epochs(self, stage: str) -> ProgressCallback:
        """A `ProgressCallback` for a training loop that reports ``(stage, epoch, epochs, "loss X")``."""
        return lambda _stage, done, total, message="": self(stage, done, total, epoch=done, loss=_loss(message))


class CohortRun:
    """One run directory; `run` executes (or resumes) every step. See the module docstring for the layout.

    Args:
        clip, sam: already loaded models (a `ClipModel`, a `Sam`), else loaded from ``options`` when needed.
    """

    def __init__(self, cohort: str | Path, prompt: str, out_dir: str | Path, options: CohortOptions,
                 progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None,
                 events: Optional[Callable[[dict], None]] = None, resume: bool = False, clip=None, sam=None) -> None:
        options.check()
        self.cohort, self.prompt, self.options = str(cohort), prompt.strip(), options
        if not self.prompt:
            raise InputError("--prompt is empty; say what to segment, e.g. \"brain tumor\"")
        self.dir = Path(out_dir)
        self.report = _Reporter(progress, events)
        self.cancel = cancel
        self.device = distributed.init_from_env(resolve_device(options.device))
        self._clip, self._sam = clip, sam
        self._clip_scorer = self._segmenter = self._classifier = self._classifier_name = None
        self.cases = list_cohort(cohort)
        self.held_out = held_out_cases(options.holdout_split, self.cases) if options.holdout_split else []
        self.training_cases = [case for case in self.cases if case not in self.held_out]
        self._start(resume)

    # ---- run directory -------------------------------------------------------------------------------

    def _start(self, resume: bool) -> None:
        from .slice_labels import default_prompts

        normal, abnormal = default_prompts(self.prompt)
        config = {"cohort": self.cohort, "prompt": self.prompt, "options": asdict(self.options),
                  "normal_prompt": self.options.normal_prompt or normal,
                  "abnormal_prompt": self.options.abnormal_prompt or abnormal,
                  "held_out_cases": [case.case_id for case in self.held_out],
                  "labels_used_for_training": False,
                  "deviations": [f"{name}: {text}" for name, text in deviations.COHORT.items()],
                  "world_size": distributed.world_size(),
                  "clisc_version": __version__}
        config_file = self.dir / "config.json"
        if config_file.is_file() and not resume:
            raise InputError(f"{self.dir} holds a run already; pass --resume to continue it, or choose another "
                             "--out folder")
        if resume and config_file.is_file():
            saved = json.loads(config_file.read_text())
            changed = [key for key in ("cohort", "prompt", "normal_prompt", "abnormal_prompt")
                       if saved[key] != config[key]]
            changed += [f"--{key.replace('_', '-')}" for key, value in config["options"].items()
                        if key not in RESUMABLE_CHANGES and saved["options"].get(key) != value]
            if saved.get("held_out_cases", []) != config["held_out_cases"]:
                changed.append("the cases --holdout-split lists")
            if changed:
                raise InputError(f"{self.dir}: cannot resume with different settings ({', '.join(changed)}); use "
                                 "the original ones or a new --out folder")
        self._check_models()
        if self.options.labels and not label_paths(self.options.labels, [case.case_id for case in self.cases]):
            raise InputError(f"--labels {self.options.labels}: no label file matches a case id of the cohort "
                             f"(e.g. {self.cases[0].case_id})")
        distributed.barrier()  # every rank has checked config.json before rank 0 writes it
        for folder in ("done", "skipped", "slice_labels", "classifier", "cams", "cams_amda", "pseudo_labels",
                       "unet", "s3f", "predictions"):
            (self.dir / folder).mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            _write_json(config_file, config)
            for path in remove_partial_files(self.dir):
                logger.info("removed %s, left by an interrupted write", path)
        self.normal_prompt, self.abnormal_prompt = config["normal_prompt"], config["abnormal_prompt"]
        log_name = "run.log" if distributed.is_main() else f"run.rank{distributed.rank()}.log"
        self._log_handler = logging.FileHandler(self.dir / log_name)
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))

    def _check_models(self) -> None:
        """Fail before any work when a model is missing."""
        from ..models.loaders import resolve

        if self._clip is None:
            resolve(self.options.clip, "clip")
        if self._sam is None:
            resolve(self.options.sam, "sam")
        if self.options.classifier_weights:
            resolve(self.options.classifier_weights, "classifier")

    def _done(self, step: str) -> bool:
        return (self.dir / "done" / step).is_file()

    def _mark_done(self, step: str) -> None:
        distributed.barrier()
        if distributed.is_main():
            write_bytes(self.dir / "done" / step, b"")
        logger.info("step %s finished", step)

    def _skip(self, item_or_case, stage: str, error: BaseException) -> None:
        case = getattr(item_or_case, "case", item_or_case)
        reason = f"{type(error).__name__}: {error}"
        logger.warning("case %s skipped at %s: %s", case.case_id, stage, reason)
        _write_json(self.dir / "skipped" / f"{case.case_id}.json",
                    {"case_id": case.case_id, "path": str(case.path), "stage": stage, "reason": reason})

    def skipped(self) -> dict:
        """{case_id: record} of the cases skipped so far."""
        return {path.stem: json.loads(path.read_text()) for path in sorted((self.dir / "skipped").glob("*.json"))}

    # ---- steps --------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Run every step not yet finished; returns the summary (also in ``RUN_DIR/summary.json``)."""
        logger.addHandler(self._log_handler)
        level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)  # the run log records every step, whatever the caller's logging
        try:
            logger.info("cohort %s: %d case(s), %d held out; prompt %r; device %s; rank %d of %d", self.cohort,
                        len(self.cases), len(self.held_out), self.prompt, self.device, distributed.rank(),
                        distributed.world_size())
            loaded = self._load(self.training_cases, "load")
            skipped = self.skipped()
            training = [item for item in loaded if item.case_id not in skipped]
            if not training:
                raise InputError(f"{self.cohort}: no case could be loaded; see {self.dir / 'skipped'}")
            training = self._per_case("slice_labels", training, "slice_labels/{}.json", self._slice_labels)
            self._train_classifier("classifier", training, amda=False)
            training = self._per_case("cams", training, "cams/{}.npz",
                                      lambda item: self._cams(item, "classifier/classifier.pt", "cams"))
            self._train_classifier("classifier_amda", training, amda=True)
            training = self._per_case("cams_amda", training, "cams_amda/{}.npz",
                                      lambda item: self._cams(item, "classifier/classifier_amda.pt", "cams_amda"))
            training = self._per_case("pseudo_labels", training, "pseudo_labels/{}.nii.gz", self._pseudo_label)
            if not training:
                raise InputError(f"no case of the cohort could be processed; see {self.dir / 'skipped'}")
            if self.options.stop_after == "pseudo_labels":
                return self._summary(loaded, [], None)
            labels = {item.case_id: self._read_pseudo_label(item) for item in training}
            self._train_unet(0, [(item.image, labels[item.case_id]) for item in training])
            for round_ in range(1, self.options.s3f_rounds + 1):
                selected = self._s3f(round_, training)
                self._train_unet(round_, [(item.image, selected[item.case_id]) for item in training
                                          if item.case_id in selected])
            self._finish()
            held_out = self._load(self.held_out, "load_held_out")
            self._predict("predictions_held_out", held_out)
            metrics = None
            if self.options.labels:
                self._predict("predictions", loaded)
                metrics = self._evaluate(loaded, held_out)
            return self._summary(loaded, held_out, metrics)
        finally:
            logger.setLevel(level)
            logger.removeHandler(self._log_handler)
            self._log_handler.close()

    def _load(self, cases: list[Case], stage: str) -> list[_Loaded]:
        """Read and pre-process ``cases`` (every rank needs every image for U-Net training), reporting progress
        as ``stage``; a case that cannot be read or pre-processed is skipped at stage "load"."""
        loaded = []
        for n, case in enumerate(cases):
            self._check_cancel()
            try:
                volume = read_volume(case.path)
                image, crop = preprocess(volume)
                loaded.append(_Loaded(case, image, body_mask(volume.array)[crop], to_uint8_slices(image), crop,
                                      volume.array.shape, volume.ijk_to_ras))
            except Exception as error:  # noqa: BLE001 - any unreadable case is reported and skipped
                if distributed.is_main():
                    self._skip(case, "load", error)
            self.report(stage, n + 1, len(cases), case=case.case_id)
        distributed.barrier()
        return loaded

    def _check_cancel(self) -> None:
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()

    def _per_case(self, step: str, items: list[_Loaded], output: str,
                  work: Callable[[_Loaded], None]) -> list[_Loaded]:
        """Run ``work`` (which writes ``output``) on this rank's share of the cases that have no output yet;
        a case whose work fails is skipped. Returns the cases not skipped."""
        if not self._done(step):
            mine = distributed.shard(items)
            for n, item in enumerate(mine):
                self._check_cancel()
                if not (self.dir / output.format(item.case_id)).is_file():
                    try:
                        work(item)
                    except Cancelled:
                        raise
                    except Exception as error:  # noqa: BLE001 - one failing case must not stop the cohort
                        self._skip(item, step, error)
                self.report(step, n + 1, len(mine), case=item.case_id)
            self._mark_done(step)
        skipped = self.skipped()
        return [item for item in items if item.case_id not in skipped]

    # CLIP slice labels (step 2)
    def _slice_labels(self, item: _Loaded) -> None:
        from .slice_labels import clip_slice_labels

        labels = clip_slice_labels(self._clip_scorer_(), item.slices, self.normal_prompt, self.abnormal_prompt,
                                   threshold=self.options.clip_threshold)
        _write_json(self.dir / "slice_labels" / f"{item.case_id}.json", [int(label) for label in labels])

    def _clip_scorer_(self):
        from ..clip_scoring import ClipScorer
        from ..models.loaders import load_clip

        if self._clip_scorer is None:
            self._clip_scorer = ClipScorer(self._clip or load_clip(self.options.clip), self.device)
        return self._clip_scorer

    def _slice_label_of(self, item: _Loaded) -> np.ndarray:
        return np.array(json.loads((self.dir / "slice_labels" / f"{item.case_id}.json").read_text()))

    # Classifier (steps 3 and 4): rank 0 trains, the others wait.
    def _train_classifier(self, step: str, items: list[_Loaded], amda: bool) -> None:
        from .amda import amda_masked_copies
        from .classifier import build_classifier, train_classifier
        from .unet import save_checkpoint

        if self._done(step):
            return
        if distributed.is_main():
            size = self.options.classifier_image_size
            images, labels, cams, masks = [], [], [], []
            for item in items:
                slice_labels = self._slice_label_of(item)
                keep = slice_labels >= 0
                images.append(_resized(item.slices[keep], size).round().astype(np.uint8))
                labels.append(slice_labels[keep])
                if amda:
                    saved = np.load(self.dir / "cams" / f"{item.case_id}.npz")
                    cams.append(_resized(saved["cam"][keep], size))
                    masks.append(_resized(saved["mask"][keep], size, "nearest") > 0.5)
            images, labels = np.concatenate(images), np.concatenate(labels)
            if len(labels) == 0:
                raise InputError(f"CLIP labelled no slice with confidence >= {self.options.clip_threshold}; "
                                 "try other --normal-prompt/--abnormal-prompt, or a lower CLIP threshold")
            if len(set(labels.tolist())) < 2:
                logger.warning("CLIP gave every confident slice the label %d: the classifier sees one class", labels[0])
            if amda:
                copies = amda_masked_copies(images, np.concatenate(cams), np.concatenate(masks), labels,
                                            np.random.default_rng(self.options.seed))
                images, labels = np.concatenate([images, copies]), np.concatenate([labels, labels])
            logger.info("%s: %d slices (%d abnormal)", step, len(labels), int(labels.sum()))
            model = build_classifier(self._classifier_weights(), seed=self.options.seed)
            losses = train_classifier(model, images, labels, self.options.classifier_epochs,
                                      batch_size=self.options.classifier_batch_size, device=self.device,
                                      progress=self.report.epochs(step), cancel=self.cancel, seed=self.options.seed,
                                      image_size=self.options.classifier_image_size)
            save_checkpoint(self.dir / "classifier" / f"{step}.pt", {"model": model.state_dict(), "losses": losses})
        self._mark_done(step)

    def _classifier_weights(self) -> Optional[Path]:
        from ..models.loaders import resolve

        return resolve(self.options.classifier_weights, "classifier") if self.options.classifier_weights else None

    def _load_classifier(self, name: str):
        from ..models.loaders import load_checkpoint
        from .classifier import build_classifier

        model = build_classifier(None, seed=self.options.seed)
        model.load_state_dict(load_checkpoint(self.dir / name))
        return model.to(self.device).eval()

    def _cams(self, item: _Loaded, classifier: str, folder: str) -> None:
        """LayerCAM on the slices the classifier calls abnormal, and their label-free binarisation."""
        from .classifier import classify, layer_cam, postprocess_cams

        if self._classifier_name != classifier:
            self._classifier, self._classifier_name = self._load_classifier(classifier), classifier
        size = self.options.classifier_image_size
        positive = classify(self._classifier, item.slices, device=self.device, image_size=size) > 0.5
        cam = np.zeros(item.slices.shape, np.float32)
        if positive.any():
            cam[positive] = layer_cam(self._classifier, item.slices[positive], device=self.device, image_size=size)
        mask = postprocess_cams(cam, item.body, positive, method=self.options.cam_threshold)
        _write_npz(self.dir / folder / f"{item.case_id}.npz", cam=cam.astype(np.float16), mask=mask,
                   positive=positive)

    # SAM pseudo-labels (step 5)
    def _segmenter_(self):
        from ..models.loaders import load_sam
        from ..sam import SliceSegmenter

        if self._segmenter is None:
            sam = (self._sam or load_sam(self.options.sam)).to(self.device)
            self._segmenter = SliceSegmenter(sam, DTYPES[self.options.sam_precision], self.options.sam_batch_size)
        return self._segmenter

    def _pseudo_label(self, item: _Loaded) -> None:
        """SAM prompted from the enhanced CAM mask, kept inside the body (as the released code does)."""
        from .pseudo_labels import sam_pseudo_label

        mask = np.load(self.dir / "cams_amda" / f"{item.case_id}.npz")["mask"]
        label = sam_pseudo_label(self._segmenter_(), item.image, mask, cancel=self.cancel) & item.body
        write_labelmap(self.dir / "pseudo_labels" / f"{item.case_id}.nii.gz", uncrop(label, item.crop, item.shape),
                       item.reference())

    def _read_pseudo_label(self, item: _Loaded) -> np.ndarray:
        return read_volume(self.dir / "pseudo_labels" / f"{item.case_id}.nii.gz").array[item.crop] > 0

    # U-Net (step 6) and S3F self-training (step 7)
    def _train_unet(self, round_: int, cases: list) -> None:
        from .unet import train_unet

        step = f"unet_round{round_}"
        if self._done(step):
            return
        folder = self.dir / "unet" / f"round{round_}"
        folder.mkdir(exist_ok=True)
        logger.info("%s: training on %d case(s)", step, len(cases))
        train_unet(cases, self.options.unet_epochs, self.options.patch_size, self.options.batch_size, self.device,
                   progress=self.report.epochs(step), cancel=self.cancel, seed=self.options.seed,
                   checkpoint_dir=folder, resume=True)
        self._mark_done(step)

    def _unet(self, round_: int):
        from .unet import load_unet

        return load_unet(self.dir / "unet" / f"round{round_}" / "last.pt", self.device)

    def _s3f(self, round_: int, items: list[_Loaded]) -> dict:
        """{case_id: S} of the cases S3F keeps in this round."""
        from .s3f import rank_cases, read_table, self_consistency, write_table
        from .unet import predict

        step, folder = f"s3f_round{round_}", self.dir / "s3f" / f"round{round_}"
        table = self.dir / "s3f" / f"round{round_}.csv"
        if not self._done(step):
            folder.mkdir(exist_ok=True)
            model = self._unet(round_ - 1)

            def work(item: _Loaded) -> None:
                prediction = predict(model, item.image, self.options.patch_size, self.device)
                largest, similarity = self_consistency(prediction, item.image, self._segmenter_(), item.body,
                                                       cancel=self.cancel)
                _write_npz(folder / f"{item.case_id}.npz", largest=largest,
                           similarity=np.nan if similarity is None else similarity)

            items = self._per_case(f"{step}_cases", items, f"s3f/round{round_}/{{}}.npz", work)
            if distributed.is_main():
                stored = {item.case_id: float(np.load(folder / f"{item.case_id}.npz")["similarity"]) for item in items}
                similarities = {case: None if np.isnan(value) else value for case, value in stored.items()}
                write_table(rank_cases(similarities, self.options.s3f_keep), table)
            self._mark_done(step)
        kept = {row.case_id for row in read_table(table) if row.kept}
        logger.info("%s: keeps %d of %d case(s)", step, len(kept), len(items))
        if not kept:
            raise InputError(f"S3F round {round_}: the U-Net predicts nothing on any case, so nothing is left to "
                             f"self-train on; train longer (--unet-epochs) or with --s3f-rounds 0 ({table})")
        return {case_id: np.load(folder / f"{case_id}.npz")["largest"] for case_id in kept}

    def _finish(self) -> None:
        """unet/final.pt (the last round's model) and the loss curves."""
        if distributed.is_main():
            self._write_final()
        distributed.barrier()

    def _write_final(self) -> None:
        from .unet import save_checkpoint

        last = self.options.s3f_rounds
        state = torch.load(self.dir / "unet" / f"round{last}" / "last.pt", map_location="cpu", weights_only=True)
        save_checkpoint(self.dir / "unet" / "final.pt", {"model": state["model"], "round": last})
        losses = {name: torch.load(path, map_location="cpu", weights_only=True)["losses"]
                  for name, path in [(f"classifier/{n}", self.dir / "classifier" / f"{n}.pt")
                                     for n in ("classifier", "classifier_amda")]
                  + [(f"unet/round{r}", self.dir / "unet" / f"round{r}" / "last.pt") for r in range(last + 1)]}
        _write_json(self.dir / "losses.json", losses)
        plot_losses(losses, self.dir / "loss_curves.png")

    # Predictions and evaluation (labels read here only)
    def _predict(self, step: str, items: list[_Loaded]) -> None:
        """predictions/CASE.nii.gz of this rank's share of ``items`` that have none: the final U-Net's masks."""
        from .unet import load_unet, predict

        if self._done(step) or not items:
            return
        model = load_unet(self.dir / "unet" / "final.pt", self.device)
        mine = distributed.shard(items)
        for n, item in enumerate(mine):
            self._check_cancel()
            output = self.dir / "predictions" / f"{item.case_id}.nii.gz"
            if not output.is_file():
                mask = predict(model, item.image, self.options.patch_size, self.device)
                write_labelmap(output, uncrop(mask, item.crop, item.shape), item.reference())
            self.report(step, n + 1, len(mine), case=item.case_id)
        self._mark_done(step)

    def _evaluate(self, loaded: list[_Loaded], held_out: list[_Loaded]) -> dict:
        """metrics.json: the final U-Net's scores on the training cohort and, apart, on the held-out cases."""
        metrics = {"empty_case_rule": EMPTY_CASE_RULE, "foreground": "label > 0", "nsd_tolerance_mm": NSD_TOLERANCE_MM,
                   "labels": str(self.options.labels), "holdout_split": self.options.holdout_split,
                   "model": "unet/final.pt",
                   "training_cohort": self._scores(self.training_cases, loaded, TRAINING_NOTE)}
        if self.held_out:
            metrics["held_out"] = self._scores(self.held_out, held_out, HELD_OUT_NOTE)
        if distributed.is_main():
            _write_json(self.dir / "metrics.json", metrics)
        return metrics

    def _scores(self, cases: list[Case], loaded: list[_Loaded], note: str) -> dict:
        """A section of metrics.json: the scores of each of ``cases`` (``loaded``: those that could be loaded),
        the reason each other one is not scored, and the mean and median Dice and the mean HD95."""
        label_files = label_paths(self.options.labels, [case.case_id for case in cases])
        items = {item.case_id: item for item in loaded}
        section = {"note": note, "cases": {}, "not_evaluated": {}}
        for case in cases:
            result = self._score(items.get(case.case_id), label_files.get(case.case_id))
            section["cases" if isinstance(result, dict) else "not_evaluated"][case.case_id] = result
        dice = [scores["dice"] for scores in section["cases"].values()]
        if dice:
            section.update(mean_dice=float(np.mean(dice)), median_dice=float(np.median(dice)),
                           mean_hd95_mm=float(np.mean([s["hd95_mm"] for s in section["cases"].values()])))
        return section

    def _score(self, item: Optional[_Loaded], label_file: Optional[Path]) -> dict | str:
        """`clisc.metrics.evaluate` of one case's prediction, or why it cannot be scored."""
        if item is None:
            return "could not be loaded"
        if label_file is None:
            return "no label file"
        truth = read_volume(label_file)
        if truth.array.shape != item.shape:
            return f"label shape {truth.array.shape} differs from the image's"
        prediction = read_volume(self.dir / "predictions" / f"{item.case_id}.nii.gz").array > 0
        return evaluate(prediction, truth.array > 0, truth.spacing[::-1])

    def _summary(self, loaded: list[_Loaded], held_out: list[_Loaded], metrics: Optional[dict]) -> dict:
        model = self.dir / "unet" / "final.pt"
        summary = {"run_dir": str(self.dir), "cases": len(self.cases), "loaded": len(loaded),
                   "skipped": self.skipped(), "model": str(model) if model.is_file() else None}
        if metrics is not None:
            summary["training_cohort"] = _means(metrics["training_cohort"])
        if self.held_out:
            summary["held_out"] = {"cases": [case.case_id for case in self.held_out], "predicted": len(held_out)}
            if metrics is not None:
                summary["held_out"].update(_means(metrics["held_out"]))
            elif held_out:
                summary["held_out"]["note"] = ("not scored: no --labels (`clisc evaluate RUN_DIR LABELS --cases "
                                               "HOLDOUT_FILE` scores them)")
        if distributed.is_main():
            _write_json(self.dir / "summary.json", summary)
        return summary


def _resized(slices: np.ndarray, size: int, mode: str = "bilinear") -> np.ndarray:
    """(N, size, size) float32 of slices (N, H, W), resized as the classifier resizes its input (whole slice,
    no crop), so that slices of volumes of different sizes train together."""
    tensor = torch.as_tensor(np.ascontiguousarray(slices)).float()[:, None]
    if mode == "nearest":
        return F.interpolate(tensor, size=(size, size), mode="nearest")[:, 0].numpy()
    return F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[:, 0].numpy()


def held_out_cases(holdout_split: str | Path, cases: list[Case]) -> list[Case]:
    """The cases that the file ``holdout_split`` lists (case ids, as `read_case_list` reads them).

    Raises:
        InputError: the file is missing or lists no id, lists an id that is not a case of ``cases``, or lists
            every case (nothing would be left to train on).
    """
    ids = set(read_case_list(Path(holdout_split), "--holdout-split"))
    known = [case.case_id for case in cases]
    unknown = sorted(ids - set(known))
    if unknown:
        raise InputError(f"--holdout-split {holdout_split}: not case ids of the cohort: {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''} (its case ids are e.g. {', '.join(known[:5])})")
    if len(ids) == len(known):
        raise InputError(f"--holdout-split {holdout_split} lists every case of the cohort: nothing is left to "
                         "train on")
    return [case for case in cases if case.case_id in ids]


def _means(section: dict) -> dict:
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


def label_paths(labels: str | Path, case_ids: Optional[list[str]] = None) -> dict[str, Path]:
    """{case_id: labelmap file} from a folder (files named CASE_ID + a volume suffix) or a CSV with columns
    ``case_id`` and ``label`` (relative paths are relative to the CSV's folder); only ``case_ids`` when given."""
    labels = Path(labels)
    wanted = (lambda case: True) if case_ids is None else (lambda case: case in case_ids)
    if labels.is_dir():
        found = {}
        for path in labels.iterdir():
            for suffix in LABEL_SUFFIXES:
                if path.name.endswith(suffix) and wanted(path.name[:-len(suffix)]):
                    found[path.name[:-len(suffix)]] = path
        return found
    if labels.suffix.lower() == ".csv" and labels.is_file():
        with open(labels, newline="") as file:
            rows = list(csv.DictReader(file))
        if not rows or not {"case_id", "label"} <= set(rows[0]):
            raise InputError(f"{labels}: a labels CSV needs the columns case_id and label")
        return {row["case_id"]: labels.parent / row["label"] for row in rows if wanted(row["case_id"])}
    raise InputError(f"--labels {labels}: give a folder of CASE_ID.nii.gz files or a CSV with columns case_id,label")


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


def run_cohort(cohort: str | Path, prompt: str, out_dir: str | Path, options: Optional[CohortOptions] = None,
               progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None,
               events: Optional[Callable[[dict], None]] = None, resume: bool = False, clip=None, sam=None) -> dict:
    """Pseudo-label a cohort and self-train a 3D U-Net (CLISC), in ``out_dir``; see `CohortRun`.

    Returns:
        A summary: the run folder, case counts, skipped cases with reasons, the final model's path, with
        ``options.holdout_split`` the held-out cases (and how many were predicted), and with ``options.labels``
        the final model's mean and median Dice and mean HD95 (mm) on the training cohort ("training_cohort")
        and on the held-out cases ("held_out"); `summary_lines` puts it in words.
    """
    return CohortRun(cohort, prompt, out_dir, options or CohortOptions(), progress, cancel, events, resume,
                     clip, sam).run()



def apply_run(run_dir: str | Path, volume: Volume, device: str = "auto", progress: ProgressCallback = no_progress,
              cancel: Optional[CancelToken] = None) -> SegmentResult:
    """Segment ``volume`` with a run's final U-Net: pre-processed as in training, sliding-window inference,
    the result put back on the volume's grid. Returns one (K, J, I) bool mask named after the run's prompt."""
    from .unet import load_unet, predict

    run_dir = Path(run_dir)
    model_file, config_file = run_dir / "unet" / "final.pt", run_dir / "config.json"
    if not model_file.is_file() or not config_file.is_file():
        raise InputError(f"{run_dir}: not a finished CLISC run (no unet/final.pt or config.json); run `clisc train` "
                         "to the end first (with --resume to finish an interrupted run)")
    config = json.loads(config_file.read_text())
    device = resolve_device(device)
    start = time.perf_counter()
    image, crop = preprocess(volume)
    mask = predict(load_unet(model_file, device), image, config["options"]["patch_size"], device, progress=progress,
                   cancel=cancel)
    report = {"trained_run": str(run_dir), "device": str(device), "seconds": {"apply": time.perf_counter() - start}}
    return SegmentResult([uncrop(mask, crop, volume.array.shape)], [config["prompt"]], [], report)
