"""Target profiles: chosen from the prompt's words or by name, overridden setting by setting, and applied by the
zero-shot pipeline (K components, a box per component, β, the 3D component rule), with the report saying which
profile was used, why, and which flags replaced its settings.

The pipeline tests give the pipeline an oracle saliency (the target's blurred mask) and a SAM that fills its box
(see test_zeroshot), on a real BraTS volume with a second, planted lesion: they show which components each rule
keeps, not how well a real saliency finds them.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import shared_data
from test_zeroshot import oracle_segmenter, tiny_models  # noqa: F401 - the fixture

from clisc.errors import InputError
from clisc.profiles import PROFILES, choose_profile, with_overrides
from clisc.readers import read_volume
from clisc.volume import Volume
from clisc.zeroshot import preset_options


@pytest.mark.parametrize("prompt, two_dimensional, profile, word", [
    ("brain tumor", False, "tumor", "tumor"),
    ("glioblastoma", False, "tumor", "glioblastoma"),
    ("liver lesions", False, "lesion", "lesions"),
    ("brain metastases", False, "lesion", "metastases"),
    ("lungs", False, "paired-organ", "lungs"),
    ("both kidneys", False, "paired-organ", "kidneys"),
    ("left kidney", False, "organ", None),
    ("left lungs", False, "organ", None),
    ("liver", False, "organ", None),
    ("breast tumor", True, "breast-us", "breast"),
    ("breast tumor", False, "tumor", "tumor"),
])
def test_the_profile_follows_the_prompts_words(prompt, two_dimensional, profile, word):
    chosen, why = choose_profile(prompt, two_dimensional=two_dimensional)
    assert chosen.name == profile
    assert word is None or word in why


def test_the_profiles_hold_the_papers_settings():
    assert all(profile.beta == 1.0 for profile in PROFILES.values())  # β 2 comes from a brain word (test_method_rules)
    assert (PROFILES["paired-organ"].components, PROFILES["paired-organ"].box_per_component) == (2, True)
    assert PROFILES["tumor"].keep_3d == "largest" and float(PROFILES["lesion"].keep_3d) > 0


def test_a_flag_replaces_one_setting_and_says_so():
    profile, changed = with_overrides(PROFILES["tumor"], beta=1.5, components=1, keep_3d=None)
    assert profile.beta == 1.5 and profile.components == 1 and profile.keep_3d == "largest"
    assert changed == {"beta": {"profile": 1.0, "given": 1.5}}  # a flag equal to the profile's is no change


@pytest.mark.parametrize("overrides, message", [
    ({"components": 0}, "--components 0: use a whole number of 1 or more"),
    ({"beta": -1.0}, "--beta -1.0"),
    ({"keep_3d": "big"}, "--keep-3d 'big'"),
    ({"prompt_type": "circle"}, "box, points, both"),
])
def test_bad_settings_are_refused_with_the_valid_values(overrides, message):
    with pytest.raises(InputError, match=message):
        with_overrides(PROFILES["organ"], **overrides)
    with pytest.raises(InputError, match="auto or one of tumor, lesion, paired-organ, organ, breast-us"):
        choose_profile("x", "kidney")


@pytest.fixture(scope="module")
def two_lesions():
    """BraTS pat0001 slices 60-90 (tumour present), its tumour, and a 6×6×6 voxel (216 mm³) cube planted in the
    other hemisphere, a second lesion well apart from the first."""
    volume = read_volume(shared_data("brats2015/pat0001/flair.nii.gz"))
    truth = read_volume(shared_data("brats2015/pat0001/label.nii.gz")).array > 0
    array, truth = volume.array[60:91].copy(), truth[60:91].copy()
    tumour_columns = np.flatnonzero(truth.any(axis=(0, 1)))
    column = 60 if tumour_columns.mean() > 120 else 170
    cube = np.zeros_like(truth)
    cube[12:18, 120:126, column:column + 6] = True
    shift = np.eye(4)
    shift[2, 3] = 60
    return Volume(array, volume.ijk_to_ras @ shift, volume.source), truth | cube, cube


def components(mask: np.ndarray) -> list:
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    return sorted(np.bincount(labels.ravel())[1:].tolist(), reverse=True)


def test_tumor_keeps_one_lesion_and_lesion_keeps_both(two_lesions):
    """The profiles' 3D rules, in the every-slice mode (the seeded mode's own tests are in test_seeded.py)."""
    volume, truth, cube = two_lesions
    results = {}
    for profile in ("tumor", "lesion"):
        options = preset_options("fast", mode="every-slice", slices="all", profile=profile)
        results[profile] = oracle_segmenter(options, volume, truth, blur=1).segment(volume, ["lesion"])
    assert len(components(results["tumor"].masks[0])) == 1
    kept = results["lesion"].masks[0]
    assert len(components(kept)) == 2 and kept[cube].all()
    report = results["lesion"].report["profiles"]["lesion"]
    assert report["profile"] == "lesion" and report["why"] == "chosen" and report["overridden_by_flags"] == {}
    # a size rule above the planted cube's 216 mm³ drops it
    options = preset_options("fast", mode="every-slice", slices="all", profile="lesion", keep_3d="300")
    large_only = oracle_segmenter(options, volume, truth, blur=1).segment(volume, ["lesion"])
    assert len(components(large_only.masks[0])) == 1 and not large_only.masks[0][cube].any()
    assert large_only.report["profiles"]["lesion"]["overridden_by_flags"] == {
        "keep_3d": {"profile": PROFILES["lesion"].keep_3d, "given": "300"}}


def test_a_paired_organ_gets_a_box_per_component(two_lesions):
    """Both blobs on the same slices: K = 2 with a box each keeps both; the organ profile keeps one."""
    volume, truth, cube = two_lesions
    both = oracle_segmenter(preset_options("fast", mode="every-slice", slices="all"), volume, truth, blur=1).segment(
        volume, ["kidneys"])
    assert both.report["profiles"]["kidneys"]["profile"] == "paired-organ"
    boxes = [len(p["boxes"]) for p in both.report["sam_prompts"]["kidneys"].values()]
    assert max(boxes) == 2 and len(components(both.masks[0])) == 2
    one = oracle_segmenter(preset_options("fast", mode="every-slice", slices="all"), volume, truth, blur=1).segment(
        volume, ["left kidney"])
    assert one.report["profiles"]["left kidney"]["profile"] == "organ" and len(components(one.masks[0])) == 1


def test_beta_reaches_m2ib_and_the_report_lists_the_deviations(tiny_models):  # noqa: F811
    """M2IB (10 steps) on a real slice with a tiny random CLIP: β 2 (a brain target) and β 1 (--beta 1) give
    different maps (they differed by up to 0.69)."""
    from test_zeroshot import brats_crop

    from clisc.zeroshot import ZeroShotSegmenter

    volume = brats_crop()
    volume = Volume(volume.array[:1], volume.ijk_to_ras, volume.source)
    maps = {}
    for beta in (None, 1.0):
        options = preset_options("fast", slices="all", beta=beta,
                                 saliency_options={"steps": 10, "samples": 2})
        result = ZeroShotSegmenter(options, *tiny_models).segment(volume, ["brain tumor"])
        maps[beta] = result.saliency[0]
        assert result.report["profiles"]["brain tumor"]["settings"]["beta"] == (beta or 2.0)
    assert not np.allclose(maps[None], maps[1.0], atol=1e-3)
    for deviation in ("3D component rule", "saliency back on the slice"):
        assert any(deviation in note for note in result.report["deviations"])
    assert result.report["slice_gate"] is None  # --slices all: no gate
    gated = ZeroShotSegmenter(preset_options("fast", saliency="gradcam"), *tiny_models).segment(volume, ["x"])
    assert gated.report["slice_gate"]["threshold"] == 0.5 and "our addition" in gated.report["slice_gate"]["what"]
