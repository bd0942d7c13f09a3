"""What a cohort run sets up before its steps: its progress reporter, its config.json, the held-out cases, and
what may not change when it is resumed."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from .. import __version__, deviations
from ..errors import InputError
from ..progress import ProgressCallback
from . import distributed
from .cases import Case, read_case_list
from .options import RESUMABLE_CHANGES, CohortOptions


class Reporter:
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
        self.progress(stage, done, total, message, case=case, epoch=epoch, loss=loss)
        if self.events is not None:
            self.events({"stage": stage, "case": case, "epoch": epoch, "loss": loss, "done": done, "total": total})

    def epochs(self, stage: str) -> ProgressCallback:
        """A `ProgressCallback` for a training loop: its epoch and loss fields reported under ``stage``."""
        return lambda _stage, done, total, message="", epoch=None, loss=None, **fields: self(
            stage, done, total, epoch=epoch, loss=loss)


def run_config(cohort: str, prompt: str, options: CohortOptions, held_out: list[Case]) -> dict:
    """config.json of a run: its cohort, prompt, options (the classifier already chosen), the CLIP prompts, the
    held-out cases and the deviations from the paper and its released code that apply."""
    from .slice_labels import default_prompts

    normal, abnormal = default_prompts(prompt)
    config = {"cohort": cohort, "prompt": prompt, "options": asdict(options),
              "normal_prompt": options.normal_prompt or normal,
              "abnormal_prompt": options.abnormal_prompt or abnormal,
              "held_out_cases": [case.case_id for case in held_out],
              "labels_used_for_training": False,
              "deviations": [f"{name}: {text}" for name, text in deviations.COHORT.items()],
              "world_size": distributed.world_size(),
              "clisc_version": __version__}
    if options.classifier in deviations.CLASSIFIER_BACKBONE:
        config["deviations"].append(deviations.CLASSIFIER_BACKBONE[options.classifier])
    if options.classifier_weights is None:
        config["deviations"].append(deviations.RANDOM_CLASSIFIER)
    return config


def check_models(options: CohortOptions, to_load: tuple[bool, bool, bool], download: bool,
                 progress: ProgressCallback) -> None:
    """Before any work: check the models a run will load (``to_load``: CLIP, SAM, the classifier's weights, each
    unless the caller gave the model), and download the missing ones or name them all."""
    from ..models.first_use import prepare_models

    clip, sam, classifier = to_load
    models = ([(options.clip, "clip")] if clip else []) + ([(options.sam, "sam")] if sam else [])
    if options.classifier_weights and classifier:
        models.append((options.classifier_weights, "classifier"))
    no_download = ("downloads are off (--no-download)" if not download else
                   "under torchrun every process would download it" if distributed.world_size() > 1 else None)
    prepare_models(models, no_download, progress)


def changed_settings(saved: dict, config: dict) -> list[str]:
    """What differs between a run's saved config.json and the config of its resumption, in words."""
    changed = [key for key in ("cohort", "prompt", "normal_prompt", "abnormal_prompt") if saved[key] != config[key]]
    saved_options = {"classifier": "resnet50", **saved["options"]}  # runs from before the choice were ResNet-50
    changed += [f"--{key.replace('_', '-')}" for key, value in config["options"].items()
                if key not in RESUMABLE_CHANGES and saved_options.get(key) != value]
    if saved.get("held_out_cases", []) != config["held_out_cases"]:
        changed.append("the cases --holdout-split lists")
    return changed


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
