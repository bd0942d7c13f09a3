"""The CLISC cohort run (METHOD.md §B): step by step, in a run folder (`run_folder`) that survives a kill.

Steps: load (each case pre-processed once into the run folder, then read from there one case at a time) →
CLIP slice labels → slice classifier → LayerCAM → AMDA classifier → LayerCAM → SAM pseudo-labels → U-Net
round 0 → S3F rounds → final U-Net → held-out predictions → with --labels, every prediction and metrics.json.

Held-out cases (--holdout-split, a list of case ids) take part in no step before the final U-Net: they are
loaded only then, predicted, and scored apart from the training cohort.

Resuming skips finished steps, per-case outputs that exist, and U-Net epochs in the checkpoint. Ground-truth
labels are read only by the evaluation step, after training.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..errors import Cancelled, InputError, WriteError
from ..precision import DTYPES
from ..progress import CancelToken, ProgressCallback, no_progress
from ..protocols import SliceClassifier
from ..readers import read_volume
from ..result import resolve_device
from ..writers import reporting_write_errors, write_labelmap
from . import distributed
from .case_store import StoredCase, TrainingPairs, is_stored, open_case, store_case
from .cases import Case, list_cohort, uncrop
from .evaluation import (empty_pseudo_labels, label_paths, nothing_to_learn, run_metrics, run_summary, what_to_try,
                         write_final_model)
from .options import CohortOptions, classifier_choice
from .run_folder import RunFolder
from .run_setup import Reporter, changed_settings, check_models, held_out_cases, run_config

logger = logging.getLogger("clisc")


class CohortRun:
    """One run folder; `run` executes (or resumes) every step.

    Args:
        clip, sam: already loaded models (a `ClipModel`, a `Sam`), else loaded from ``options`` when needed.
        classifier: builds the untrained slice classifier (a `clisc.protocols.SliceClassifier`); default: the
            paper's ResNet-50 with ``options.classifier_weights``.
        download: download the catalogue models not installed yet (`clisc.models.first_use`); never under
            torchrun, where every process would.
    """

    def __init__(self, cohort: str | Path, prompt: str, out_dir: str | Path, options: CohortOptions,
                 progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None,
                 events: Optional[Callable[[dict], None]] = None, resume: bool = False, clip=None, sam=None,
                 classifier: Optional[Callable[[], SliceClassifier]] = None, download: bool = True) -> None:
        options.check()
        self.cohort, self.prompt, self.options = str(cohort), prompt.strip(), options
        if not self.prompt:
            raise InputError("--prompt is empty; say what to segment, e.g. \"brain tumor\"")
        self.folder = RunFolder(out_dir)
        self.report = Reporter(progress, events)
        self.cancel = cancel
        self.device = distributed.init_from_env(resolve_device(options.device))
        self._clip, self._sam, self._build_classifier = clip, sam, classifier
        self.download = download
        self._clip_scorer = self._segmenter = self._classifier = None
        self._classifier_amda: Optional[bool] = None
        self.empty_pseudo_labels: dict[str, str] = {}  # case_id: why its pseudo-label is empty
        self.stopped: Optional[str] = None  # why the run stopped before training the U-Net
        self.cases = list_cohort(cohort)
        self.held_out = held_out_cases(options.holdout_split, self.cases) if options.holdout_split else []
        self.training_cases = [case for case in self.cases if case not in self.held_out]
        self._start(resume)

    # ---- the run folder

    def _start(self, resume: bool) -> None:
        if resume and self.folder.is_run() and self.options.classifier == "auto":  # the backbone it started with
            self.options = replace(self.options, classifier=self.folder.config()["options"].get("classifier",
                                                                                                 "resnet50"))
        self.classifier_auto = self.options.classifier == "auto"
        backbone, weights = classifier_choice(self.options)
        self.options = replace(self.options, classifier=backbone, classifier_weights=weights)
        config = run_config(self.cohort, self.prompt, self.options, self.held_out)
        if self.folder.is_run() and not resume:
            raise InputError(f"{self.folder.path} holds a run already; pass --resume to continue it, or choose "
                             "another --out folder")
        if resume and self.folder.is_run():
            changed = changed_settings(self.folder.config(), config)
            if changed:
                raise InputError(f"{self.folder.path}: cannot resume with different settings ({', '.join(changed)}); "
                                 "use the original ones or a new --out folder")
        check_models(self.options, (self._clip is None, self._sam is None, self._build_classifier is None),
                     self.download, lambda stage, done, total, *_, **__: self.report(stage, done, total))
        if self.options.labels and not label_paths(self.options.labels, [case.case_id for case in self.cases]):
            raise InputError(f"--labels {self.options.labels}: no label file matches a case id of the cohort "
                             f"(e.g. {self.cases[0].case_id})")
        distributed.barrier()  # every rank has checked config.json before rank 0 writes it
        self.folder.create()
        if distributed.is_main():
            self.folder.write_json(self.folder.config_file, config)
            for path in self.folder.remove_partial_files():
                logger.info("removed %s, left by an interrupted write", path)
        self.normal_prompt, self.abnormal_prompt = config["normal_prompt"], config["abnormal_prompt"]
        self._log_handler = logging.FileHandler(self.folder.log_file(distributed.rank()))
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s"))

    def _mark_done(self, step: str) -> None:
        distributed.barrier()
        if distributed.is_main():
            self.folder.mark_done(step)
        logger.info("step %s finished", step)

    def _skip(self, case: Case, stage: str, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"
        logger.warning("case %s skipped at %s: %s", case.case_id, stage, reason)
        self.folder.skip(case.case_id, case.path, stage, reason)

    def _check_cancel(self) -> None:
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()

    # ---- the steps

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
            logger.info("slice classifier: %s from %s%s", self.options.classifier,
                        self.options.classifier_weights or "random weights",
                        " (--classifier auto: the ResNet-50 ImageNet weights are not installed; `clisc models "
                        "download resnet50_imagenet` gets the paper's backbone)"
                        if self.classifier_auto and self.options.classifier != "resnet50" else "")
            loaded = self._load(self.training_cases, "load")
            if not loaded:
                raise InputError(f"{self.cohort}: no case could be loaded; see {self.folder.path / 'skipped'}")
            training = self._per_case("slice_labels", loaded, self.folder.slice_labels, self._slice_labels)
            self._train_classifier("classifier", training, amda=False)
            training = self._per_case("cams", training, lambda case_id: self.folder.cams(case_id, amda=False),
                                      lambda item: self._cams(item, amda=False))
            self._train_classifier("classifier_amda", training, amda=True)
            training = self._per_case("cams_amda", training, lambda case_id: self.folder.cams(case_id, amda=True),
                                      lambda item: self._cams(item, amda=True))
            training = self._per_case("pseudo_labels", training, self.folder.pseudo_label, self._pseudo_label,
                                      slices=lambda item: int(self._cam_mask(item).any(axis=(1, 2)).sum()))
            if not training:
                raise InputError(f"no case of the cohort could be processed; see {self.folder.path / 'skipped'}")
            self.empty_pseudo_labels = empty_pseudo_labels(self.folder, [item.case_id for item in training])
            if self.options.stop_after == "pseudo_labels":
                return self._summary(loaded, [], None)
            if len(self.empty_pseudo_labels) == len(training):  # record why in the reports, then stop
                self.stopped = nothing_to_learn(self.folder, self.empty_pseudo_labels)
                self._summary(loaded, [], None)
                if self.options.labels and distributed.is_main():
                    self.folder.write_json(self.folder.file("metrics.json"), {
                        "stopped": self.stopped, "empty_pseudo_labels": self.empty_pseudo_labels})
                raise InputError(f"{self.stopped}\n{what_to_try(self.options, self.folder.path)}")
            self._train_unet(0, training, lambda item: read_volume(
                self.folder.pseudo_label(item.case_id)).array[item.crop] > 0)
            for round_ in range(1, self.options.s3f_rounds + 1):
                kept = self._s3f(round_, training)
                self._train_unet(round_, [item for item in training if item.case_id in kept], lambda item: np.load(
                    self.folder.s3f_case(round_, item.case_id))["largest"])
            self._finish()
            held_out = self._load(self.held_out, "load_held_out")
            self._predict("predictions_held_out", held_out)
            metrics = None
            if self.options.labels:
                self._predict("predictions", loaded)
                metrics = self._evaluate(loaded + held_out)
            return self._summary(loaded, held_out, metrics)
        finally:
            logger.setLevel(level)
            logger.removeHandler(self._log_handler)
            self._log_handler.close()

    def _load(self, cases: list[Case], stage: str) -> list[StoredCase]:
        """Pre-process into the run folder each of ``cases`` not stored yet (this rank's share), reporting
        progress as ``stage``; a case that cannot be read or pre-processed is skipped at stage "load". Returns
        every case stored (on disk: nothing is kept in memory)."""
        mine, skipped = distributed.shard(cases), self.folder.skipped()
        for n, case in enumerate(mine):
            self._check_cancel()
            folder = self.folder.preprocessed(case.case_id)
            if not is_stored(folder) and case.case_id not in skipped:
                try:
                    store_case(case, folder)
                except WriteError:  # a full disk: not the case's fault, and the next case would fail too
                    raise
                except Exception as error:  # noqa: BLE001 - any unreadable case is reported and skipped
                    self._skip(case, "load", error)
            self.report(stage, n + 1, len(mine), case=case.case_id)
        distributed.barrier()
        return [open_case(case, self.folder.preprocessed(case.case_id)) for case in cases
                if is_stored(self.folder.preprocessed(case.case_id))]

    def _per_case(self, step: str, items: list[StoredCase], output: Callable[[str], Path],
                  work: Callable[[StoredCase], None], slices: Optional[Callable[[StoredCase], int]] = None,
                  ) -> list[StoredCase]:
        """Run ``work`` (which writes ``output(case_id)``) on this rank's share of the cases that have no output
        yet; a case whose work fails is skipped. Returns the cases not skipped.

        Progress counts cases, or with ``slices`` (the number of slices ``work`` processes in a case) slices:
        ``work(item, progress)`` then reports its slices through ``progress(stage, done, total)``."""
        if not self.folder.is_done(step):
            todo = [item for item in distributed.shard(items) if not output(item.case_id).is_file()]
            sizes = [slices(item) if slices else 1 for item in todo]
            total, done = sum(sizes), 0
            if todo:  # the bar starts with the stage's first case, not after it
                self.report(step, 0, total, case=todo[0].case_id)
            for item, size in zip(todo, sizes):
                self._check_cancel()

                def inside(_stage: str, in_case: int, _total: int, message: str = "", **fields) -> None:
                    self.report(step, done + in_case, total, case=item.case_id)

                try:
                    work(item, inside) if slices else work(item)
                except (Cancelled, WriteError):
                    raise
                except Exception as error:  # noqa: BLE001 - one failing case must not stop the cohort
                    self._skip(item.case, step, error)
                done += size
                self.report(step, done, total, case=item.case_id)
            self._mark_done(step)
        skipped = self.folder.skipped()
        return [item for item in items if item.case_id not in skipped]

    # CLIP slice labels (step 2)
    def _slice_labels(self, item: StoredCase) -> None:
        from .slice_labels import clip_slice_labels

        labels = clip_slice_labels(self._clip_scorer_(), item.slices(), self.normal_prompt, self.abnormal_prompt,
                                   threshold=self.options.clip_threshold)
        self.folder.write_json(self.folder.slice_labels(item.case_id), [int(label) for label in labels])

    def _clip_scorer_(self):
        from ..clip_scoring import ClipScorer
        from ..models.loaders import load_clip

        if self._clip_scorer is None:
            self._clip_scorer = ClipScorer(self._clip or load_clip(self.options.clip), self.device)
        return self._clip_scorer

    def _slice_label_of(self, item: StoredCase) -> np.ndarray:
        return np.array(json.loads(self.folder.slice_labels(item.case_id).read_text()))

    # Classifier (steps 3 and 4): rank 0 trains, the others wait.
    def _train_classifier(self, step: str, items: list[StoredCase], amda: bool) -> None:
        from .classifier import train_classifier
        from .classifier_data import classifier_training_set
        from .unet import save_checkpoint

        if self.folder.is_done(step):
            return
        if distributed.is_main():
            scratch = self.folder.classifier_slices(amda)
            try:
                if not any((self._slice_label_of(item) >= 0).any() for item in items):
                    raise InputError(f"CLIP labelled no slice with confidence >= {self.options.clip_threshold} "
                                     "(--clip-threshold); try other --normal-prompt/--abnormal-prompt, or a lower "
                                     "--clip-threshold")
                with reporting_write_errors(scratch):
                    images, labels = classifier_training_set(self.folder, items, amda, scratch,
                                                             self.options.classifier_image_size, self.options.seed)
                logger.info("%s: %d slices (%d abnormal)", step, len(labels), int(labels.sum()))
                model = self._new_classifier()
                losses = train_classifier(model, images, labels, self.options.classifier_epochs,
                                          batch_size=self.options.classifier_batch_size, device=self.device,
                                          progress=self.report.epochs(step), cancel=self.cancel,
                                          seed=self.options.seed, image_size=self.options.classifier_image_size)
            finally:
                scratch.unlink(missing_ok=True)
            save_checkpoint(self.folder.classifier(amda), {"model": model.state_dict(), "losses": losses})
        self._mark_done(step)

    def _new_classifier(self) -> torch.nn.Module:
        from ..models.loaders import resolve
        from .classifier import build_classifier

        if self._build_classifier is not None:
            return self._build_classifier()
        weights = self.options.classifier_weights
        return build_classifier(resolve(weights, "classifier") if weights else None, seed=self.options.seed,
                                architecture=self.options.classifier)

    def _trained_classifier(self, amda: bool) -> torch.nn.Module:
        from ..models.loaders import load_checkpoint

        if self._classifier_amda != amda:
            model = self._new_classifier()
            model.load_state_dict(load_checkpoint(self.folder.classifier(amda)))
            self._classifier, self._classifier_amda = model.to(self.device).eval(), amda
        return self._classifier

    def _cams(self, item: StoredCase, amda: bool) -> None:
        """LayerCAM on the slices the classifier calls abnormal, and their label-free binarisation."""
        from .classifier import classify, layer_cam, postprocess_cams

        model, size = self._trained_classifier(amda), self.options.classifier_image_size
        slices = item.classifier_slices()
        positive = classify(model, slices, device=self.device, image_size=size) > 0.5
        cam = np.zeros(slices.shape, np.float32)
        if positive.any():
            cam[positive] = layer_cam(model, slices[positive], device=self.device, image_size=size)
        mask = postprocess_cams(cam, np.asarray(item.body), positive, method=self.options.cam_threshold)
        self.folder.write_npz(self.folder.cams(item.case_id, amda), cam=cam.astype(np.float16), mask=mask,
                              positive=positive)

    # SAM pseudo-labels (step 5)
    def _segmenter_(self):
        from ..models.loaders import load_sam
        from ..sam import SliceSegmenter

        if self._segmenter is None:
            sam = (self._sam or load_sam(self.options.sam)).to(self.device)
            self._segmenter = SliceSegmenter(sam, DTYPES[self.options.sam_precision], self.options.sam_batch_size)
        return self._segmenter

    def _cam_mask(self, item: StoredCase) -> np.ndarray:
        """The enhanced (AMDA) CAM mask (K', J', I') bool that prompts SAM."""
        return np.load(self.folder.cams(item.case_id, amda=True))["mask"]

    def _pseudo_label(self, item: StoredCase, progress: ProgressCallback) -> None:
        """SAM prompted from the enhanced CAM mask, kept inside the body (a listed deviation, as for S3F); progress
        per slice SAM segments."""
        from .pseudo_labels import sam_pseudo_label

        label = sam_pseudo_label(self._segmenter_(), np.asarray(item.image), self._cam_mask(item), progress=progress,
                                 cancel=self.cancel) & item.body
        write_labelmap(self.folder.pseudo_label(item.case_id), uncrop(label, item.crop, item.shape), item.reference())

    # U-Net (step 6) and S3F self-training (step 7)
    def _train_unet(self, round_: int, items: list[StoredCase], label: Callable[[StoredCase], np.ndarray]) -> None:
        """U-Net round ``round_`` on ``items``, each with its ``label`` (K', J', I') bool (saved first, read
        lazily while training)."""
        from .unet import train_unet

        step = f"unet_round{round_}"
        if self.folder.is_done(step):
            return
        folder = self.folder.unet_round(round_)
        folder.mkdir(exist_ok=True)
        labels = [self.folder.unet_label(round_, item.case_id) for item in items]
        if distributed.is_main():
            for item, path in zip(items, labels):
                if not path.is_file():
                    self.folder.write_npy(path, label(item))
        distributed.barrier()
        pairs = TrainingPairs(items, labels)
        logger.info("%s: training on %d case(s)", step, len(pairs))
        train_unet(pairs, self.options.unet_epochs, self.options.patch_size, self.options.batch_size, self.device,
                   progress=self.report.epochs(step), cancel=self.cancel, seed=self.options.seed,
                   checkpoint_dir=folder, resume=True, loader_workers=self.options.loader_workers)
        self._mark_done(step)

    def _s3f(self, round_: int, items: list[StoredCase]) -> set[str]:
        """The case ids S3F keeps in this round (their S in ``s3f_case(round_, case_id)``)."""
        from .s3f import rank_cases, read_table, self_consistency, write_table
        from .unet import load_unet, predict

        step, table = f"s3f_round{round_}", self.folder.s3f_table(round_)
        if not self.folder.is_done(step):
            model = load_unet(self.folder.unet_round(round_ - 1) / "last.pt", self.device)

            def work(item: StoredCase) -> None:
                image = np.asarray(item.image)
                prediction = predict(model, image, self.options.patch_size, self.device)
                largest, similarity = self_consistency(prediction, image, self._segmenter_(), np.asarray(item.body),
                                                       cancel=self.cancel)
                self.folder.write_npz(self.folder.s3f_case(round_, item.case_id), largest=largest,
                                      similarity=np.nan if similarity is None else similarity)

            items = self._per_case(f"{step}_cases", items, lambda case_id: self.folder.s3f_case(round_, case_id), work)
            if distributed.is_main():
                stored = {item.case_id: float(np.load(self.folder.s3f_case(round_, item.case_id))["similarity"])
                          for item in items}
                similarities = {case: None if np.isnan(value) else value for case, value in stored.items()}
                write_table(rank_cases(similarities, self.options.s3f_keep), table)
            self._mark_done(step)
        kept = {row.case_id for row in read_table(table) if row.kept}
        logger.info("%s: keeps %d of %d case(s)", step, len(kept), len(items))
        if not kept:
            raise InputError(f"S3F round {round_}: the U-Net predicts nothing on any case, so nothing is left to "
                             f"self-train on; train longer (--unet-epochs) or with --s3f-rounds 0 ({table})")
        return kept

    def _finish(self) -> None:
        """unet/final.pt (the last round's model) and the loss curves."""
        if distributed.is_main():
            write_final_model(self.folder, self.options.s3f_rounds)
        distributed.barrier()

    # Predictions and evaluation (labels read here only)
    def _predict(self, step: str, items: list[StoredCase]) -> None:
        """predictions/CASE.nii.gz of this rank's share of ``items`` that have none: the final U-Net's masks."""
        from .unet import load_unet, predict

        if self.folder.is_done(step) or not items:
            return
        model = load_unet(self.folder.final_model, self.device)
        mine = distributed.shard(items)
        for n, item in enumerate(mine):
            self._check_cancel()
            output = self.folder.prediction(item.case_id)
            if not output.is_file():
                mask = predict(model, np.asarray(item.image), self.options.patch_size, self.device)
                write_labelmap(output, uncrop(mask, item.crop, item.shape), item.reference())
            self.report(step, n + 1, len(mine), case=item.case_id)
        self._mark_done(step)

    def _evaluate(self, loaded: list[StoredCase]) -> dict:
        """metrics.json: the final U-Net's scores on the training cohort and, apart, on the held-out cases."""
        metrics = run_metrics(self.folder, self.options.labels, self.options.holdout_split, self.training_cases,
                              self.held_out, {item.case_id: item.shape for item in loaded})
        metrics["empty_pseudo_labels"] = self.empty_pseudo_labels
        if distributed.is_main():
            self.folder.write_json(self.folder.file("metrics.json"), metrics)
        return metrics

    def _summary(self, loaded: list[StoredCase], held_out: list[StoredCase], metrics: Optional[dict]) -> dict:
        summary = run_summary(self.folder, len(self.cases), len(loaded), [case.case_id for case in self.held_out],
                              len(held_out), self.empty_pseudo_labels, self.stopped, metrics)
        if distributed.is_main():
            self.folder.write_json(self.folder.file("summary.json"), summary)
        return summary


def run_cohort(cohort: str | Path, prompt: str, out_dir: str | Path, options: Optional[CohortOptions] = None,
               progress: ProgressCallback = no_progress, cancel: Optional[CancelToken] = None,
               events: Optional[Callable[[dict], None]] = None, resume: bool = False, clip=None, sam=None,
               classifier: Optional[Callable[[], SliceClassifier]] = None, download: bool = True) -> dict:
    """Pseudo-label a cohort and self-train a 3D U-Net (CLISC), in ``out_dir``; see `CohortRun`.

    Returns:
        A summary: the run folder, case counts, skipped cases with reasons, the final model's path, with
        ``options.holdout_split`` the held-out cases (and how many were predicted), and with ``options.labels``
        the final model's mean and median Dice and mean HD95 (mm) on the training cohort ("training_cohort")
        and on the held-out cases ("held_out"); `evaluation.summary_lines` puts it in words.
    """
    return CohortRun(cohort, prompt, out_dir, options or CohortOptions(), progress, cancel, events, resume,
                     clip, sam, classifier, download).run()
