"""Target profiles: the method settings that suit a kind of target, chosen by name or from the prompt's words.

A profile fixes M2IB's β, how many connected components the 2D coarse mask keeps (K) and whether each gets
its own SAM box, the SAM prompt type, and the 3D component rule. β is 1 in every profile, MedCLIP-SAMv2's
setting for breast ultrasound; its brain MRI setting, 2, is given (with "auto") to a prompt that names the
brain or a brain tumour, whatever the profile. K = 2 with a box per component is its paired-organ (lung)
mode. The 3D rule is not in either paper: keeping only the largest 3D component is ours, and it deletes
every lesion but one in a multifocal case, hence the "lesion" profile.

Standard library only (with `clisc.errors`): the CLI's parser and the Slicer module import it before the
environment check and before CLISC's packages are installed.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Optional

from .errors import InputError

PROMPT_TYPES = ("box", "points", "both")


@dataclass(frozen=True)
class Profile:
    """Method settings for one kind of target.

    Attributes:
        beta: M2IB's information-bottleneck weight β.
        components: K, the connected components kept in each slice's coarse mask.
        box_per_component: one SAM box per kept component (paired organs), else one box around them all.
        prompt_type: box, points or both.
        keep_3d: the 3D rule on the stacked slice masks: "largest" (the K largest 3D components), "all", or a
            size in mm³ (components smaller than that are dropped).
    """

    name: str
    description: str
    beta: float
    components: int
    box_per_component: bool
    prompt_type: str
    keep_3d: str

    def settings(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key not in ("name", "description")}


PROFILES = {profile.name: profile for profile in (
    Profile("tumor", "one tumour", 1.0, 1, False, "box", "largest"),
    Profile("lesion", "multifocal lesions: every component of 10 mm³ or more", 1.0, 3, True, "box", "10"),
    Profile("paired-organ", "both organs of a pair (lungs, kidneys): two components, a box each", 1.0, 2, True, "box",
            "largest"),
    Profile("organ", "one organ", 1.0, 1, False, "box", "largest"),
    Profile("breast-us", "a breast ultrasound lesion, 2D (MedCLIP-SAMv2's breast settings)", 1.0, 1, False, "box",
            "largest"),
)}
OVERRIDABLE = ("beta", "components", "box_per_component", "prompt_type", "keep_3d")

LESION_WORDS = ("lesion", "lesions", "metastasis", "metastases", "nodule", "nodules", "plaque", "plaques")
TUMOUR_WORDS = ("tumor", "tumors", "tumour", "tumours", "glioma", "glioblastoma", "mass", "cancer", "carcinoma",
                "neoplasm", "meningioma")
PAIRED_WORDS = ("lungs", "kidneys", "adrenals", "breasts", "ovaries", "eyes", "hippocampi", "femurs")
SIDE_WORDS = ("left", "right")
BRAIN_WORDS = ("brain", "cerebral", "cerebrum", "cerebellum", "cerebellar", "intracranial", "glioma", "gliomas",
               "glioblastoma", "glioblastomas", "astrocytoma", "meningioma", "meningiomas")
BRAIN_BETA = 2.0  # MedCLIP-SAMv2's β for brain MRI


def choose_profile(prompt: str, name: str = "auto", two_dimensional: bool = False) -> tuple[Profile, str]:
    """The profile for ``prompt`` and why: the one named, or with "auto" the one its words call for.

    Auto, first match: a breast target on a 2D image → breast-us; a lesion word ("lesions", "metastases",
    "nodules") → lesion; a tumour word → tumor; a paired organ in the plural ("lungs", "kidneys", "both
    ...") without left/right → paired-organ; anything else → organ. Then β: 2 when the prompt names the brain
    or a brain tumour ("brain", "glioma"), else the profile's 1; ``why`` gives the reason for both.
    """
    if name != "auto":
        if name not in PROFILES:
            raise InputError(f"unknown profile {name!r}; use auto or one of {', '.join(PROFILES)}")
        return PROFILES[name], "chosen"
    words = re.findall(r"[a-z]+", prompt.lower())
    profile, why = _profile_for_words(words, two_dimensional)
    brain = _first(words, BRAIN_WORDS)
    if brain:
        return (replace(profile, beta=BRAIN_BETA),
                f'{why}; β {BRAIN_BETA:g}, MedCLIP-SAMv2\'s brain MRI setting: the prompt names a brain target '
                f'("{brain}")')
    return profile, (f"{why}; β {profile.beta:g}: no brain target named (MedCLIP-SAMv2 uses β {BRAIN_BETA:g} for "
                     "brain MRI only)")


def _profile_for_words(words: list, two_dimensional: bool) -> tuple[Profile, str]:
    lesion, tumour = _first(words, LESION_WORDS), _first(words, TUMOUR_WORDS)
    pair = _first(words, PAIRED_WORDS) or _first(words, ("both",))
    if two_dimensional and "breast" in words:
        return PROFILES["breast-us"], "the prompt names the breast and the image is 2D"
    if lesion:
        return PROFILES["lesion"], f'the prompt names a lesion ("{lesion}")'
    if tumour:
        return PROFILES["tumor"], f'the prompt names a tumour ("{tumour}")'
    if pair and not _first(words, SIDE_WORDS):
        return PROFILES["paired-organ"], f'the prompt names both of a pair ("{pair}")'
    return PROFILES["organ"], "no tumour, lesion or pair named: one organ"


def _first(words: list, vocabulary: tuple) -> Optional[str]:
    return next((word for word in words if word in vocabulary), None)


def with_overrides(profile: Profile, **overrides) -> tuple[Profile, dict]:
    """``profile`` with each setting given (not None) in ``overrides`` replacing its own, and
    {setting: {"profile": value, "given": value}} of those that differ. InputError for an invalid value."""
    given = {key: value for key, value in overrides.items() if value is not None}
    unknown = set(given) - set(OVERRIDABLE)
    if unknown:
        raise ValueError(f"not a profile setting: {', '.join(sorted(unknown))}")
    if "components" in given and (not isinstance(given["components"], int) or given["components"] < 1):
        raise InputError(f"--components {given['components']}: use a whole number of 1 or more (1 for one target, "
                         "2 for a pair)")
    if "beta" in given and not given["beta"] > 0:
        raise InputError(f"--beta {given['beta']}: use a number above 0 (2 for brain MRI, 1 elsewhere)")
    if "prompt_type" in given and given["prompt_type"] not in PROMPT_TYPES:
        raise InputError(f"--prompt-type {given['prompt_type']!r}: use one of {', '.join(PROMPT_TYPES)}")
    if "keep_3d" in given:
        given["keep_3d"] = str(given["keep_3d"])
        min_component_mm3(given["keep_3d"])
    changed = {key: {"profile": getattr(profile, key), "given": value} for key, value in given.items()
               if getattr(profile, key) != value}
    return replace(profile, **given), changed


def min_component_mm3(keep_3d: str) -> Optional[float]:
    """None for "largest" or "all", else the size in mm³ that ``keep_3d`` gives."""
    if keep_3d in ("largest", "all"):
        return None
    try:
        size = float(keep_3d)
    except ValueError:
        size = -1.0
    if not size >= 0:
        raise InputError(f"--keep-3d {keep_3d!r}: use largest, all, or a size in mm³ (e.g. 10)")
    return size
