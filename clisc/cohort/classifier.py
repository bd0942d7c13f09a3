"""The slice classifier and its class activation maps (METHOD.md §B step 3).

An ImageNet CNN (the paper's ResNet-50, or EfficientNet-Lite0: `clisc.models.classifier_builders`) with the
paper's head (features→256→ReLU→Dropout 0.5→2) learns CLIP's slice labels; LayerCAM on the backbone's CAM layer
(ResNet-50: ``layer3``) for the "abnormal" class shows where it looks. Slices enter as uint8 (N, H, W): scaled to
[0, 1], resized to ``image_size`` × ``image_size`` (bilinear, whole slice, no crop, so a CAM resized back lands on
the same pixels), repeated to 3 channels, normalised with the ImageNet mean and standard deviation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.filters import threshold_isodata, threshold_otsu
from torch import nn

from ..components import keep_components
from ..errors import InputError
from ..models.classifier_builders import CAM_LAYER, FEATURE_WIDTH, HEAD, backbone_state_dict, build_backbone
from ..models.loaders import load_checkpoint
from ..progress import CancelToken, ProgressCallback, no_progress

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FULL_3D = np.ones((3, 3, 3), dtype=bool)


def build_classifier(pretrained_path: str | Path | None = None, seed: int = 0,
                     architecture: str = "resnet50") -> nn.Module:
    """An ImageNet CNN with a 2-class head: logits (B, 2) of images (B, 3, S, S).

    Args:
        pretrained_path: a state dict (read with ``weights_only=True``): the backbone's ImageNet weights (its
            catalogue file), the head new; or a slice classifier's, head included (a run's
            classifier/classifier.pt: training continues from it). None for random weights.
        seed: seeds the random initialisation (of what the state dict does not give), without touching the
            global random state.
        architecture: one of `CLASSIFIER_ARCHITECTURES`. The model's ``cam_layer`` names the module LayerCAM reads.
    """
    head_name = HEAD[architecture]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(architecture)
        head = nn.Sequential(nn.Linear(FEATURE_WIDTH[architecture], 256), nn.ReLU(), nn.Dropout(0.5),
                             nn.Linear(256, 2))
        state = load_checkpoint(Path(pretrained_path)) if pretrained_path is not None else None
        if state is not None and f"{head_name}.0.weight" in state:
            setattr(model, head_name, head)
        if state is not None:
            try:
                model.load_state_dict(backbone_state_dict(architecture, state))
            except RuntimeError as error:
                raise InputError(f"{pretrained_path}: neither ImageNet {architecture} weights nor a CLISC slice "
                                 f"classifier of that backbone ({str(error).splitlines()[0][:200]})") from None
        setattr(model, head_name, head)
    model.cam_layer = CAM_LAYER[architecture]
    return model


def to_input(images_uint8: torch.Tensor, image_size: int) -> torch.Tensor:
    """Classifier input (B, 3, S, S) float32 from uint8 slices (B, H, W), S = ``image_size``."""
    batch = images_uint8.float().div(255)[:, None]
    batch = F.interpolate(batch, size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return (batch.expand(-1, 3, -1, -1) - mean) / std


def train_classifier(model: nn.Module, images_uint8: np.ndarray, labels: np.ndarray, epochs: int,
                     batch_size: int = 8, lr: float = 1e-4, device: str | torch.device = "cpu",
                     progress: ProgressCallback = no_progress, cancel: CancelToken | None = None,
                     seed: int = 0, image_size: int = 224) -> list[float]:
    """Train in place with cross-entropy, Adam(``lr``) and StepLR(7 epochs, ×0.1), as the paper.

    Args:
        images_uint8: (N, H, W) uint8 slices, an array or anything that indexes like one (a batch of rows is
            read at a time, so a memory-mapped file never has to fit in memory); labels: (N,) int in {0, 1}.
        seed: seeds the shuffling (a ``torch.Generator``) and dropout.

    Returns:
        The mean training loss of each epoch.
    """
    targets = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        total = 0.0
        for batch in _batches(len(targets), batch_size, generator):
            if cancel is not None:
                cancel.raise_if_cancelled()
            images = torch.as_tensor(np.asarray(images_uint8[batch.numpy()]))
            logits = model(to_input(images.to(device), image_size))
            loss = F.cross_entropy(logits, targets[batch].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        scheduler.step()
        losses.append(total / len(targets))
        progress("classifier", epoch + 1, epochs, f"loss {losses[-1]:.4f}", epoch=epoch + 1, loss=losses[-1])
    model.eval()
    return losses


def _batches(count: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; a last batch of one joins the one before (batch norm needs two samples)."""
    batches = list(torch.randperm(count, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


@torch.no_grad()
def classify(model: nn.Module, images_uint8: np.ndarray, batch_size: int = 16,
             device: str | torch.device = "cpu", image_size: int = 224) -> np.ndarray:
    """Probability (N,) float32 of class 1 ("abnormal") for uint8 slices (N, H, W)."""
    model.to(device).eval()
    images = torch.as_tensor(np.ascontiguousarray(images_uint8))
    probabilities = [model(to_input(images[start:start + batch_size].to(device), image_size)).softmax(-1)[:, 1]
                     for start in range(0, len(images), batch_size)]
    return torch.cat(probabilities).cpu().numpy() if probabilities else np.zeros(0, np.float32)


def layer_cam(model: nn.Module, images_uint8: np.ndarray, target_class: int = 1, batch_size: int = 16,
              device: str | torch.device = "cpu", image_size: int = 224) -> np.ndarray:
    """LayerCAM (Jiang et al. 2021) on the module ``model.cam_layer`` names, for ``target_class``.

    With activations A (B, C, h, w) of that layer and gradients G of the class score with respect to them,
    CAM = ReLU(sum_c ReLU(G) * A), resized bilinearly to the slice size, then min-max scaled per slice
    (a flat map gives 0).

    Args:
        images_uint8: (N, H, W) uint8 slices.

    Returns:
        (N, H, W) float32 in [0, 1].
    """
    model.to(device).eval()
    images = torch.as_tensor(np.ascontiguousarray(images_uint8))
    height, width = images.shape[1:]
    captured = {}
    layer = model.get_submodule(model.cam_layer)
    hook = layer.register_forward_hook(lambda module, inputs, output: captured.update(activation=output))
    cams = []
    try:
        for start in range(0, len(images), batch_size):
            with torch.enable_grad():
                # the input requires grad so that the layer gets one even where the layers before it are frozen
                inputs = to_input(images[start:start + batch_size].to(device), image_size).requires_grad_()
                scores = model(inputs)[:, target_class]
                activation = captured["activation"]
                gradient, = torch.autograd.grad(scores.sum(), activation)  # samples are independent in eval
            cam = F.relu((F.relu(gradient) * activation).sum(1, keepdim=True)).detach()
            cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            low = cam.amin(dim=(1, 2), keepdim=True)
            span = cam.amax(dim=(1, 2), keepdim=True) - low
            cams.append(torch.where(span > 0, (cam - low) / span.clamp(min=1e-12), torch.zeros_like(cam)).cpu())
    finally:
        hook.remove()
    return torch.cat(cams).numpy().astype(np.float32) if cams else np.zeros((0, height, width), np.float32)


def postprocess_cams(cams: np.ndarray, body_mask: np.ndarray, positive: np.ndarray,
                     method: str = "otsu") -> np.ndarray:
    """Binary 3D CAM mask of one volume, without labels.

    The threshold is Otsu's ("otsu") or two-cluster k-means' ("kmeans", the ISODATA threshold in 1D) over the
    CAM values inside the body on the positive slices; the mask is kept on those voxels only, opened in 3D
    (3×3×3, full connectivity), and its components smaller than a third of the largest are dropped.

    Args:
        cams: (K, H, W) float CAMs of the slices of one volume.
        body_mask: (K, H, W) bool, the body (non-zero voxels).
        positive: (K,) bool, the slices the classifier calls abnormal.

    Returns:
        (K, H, W) bool.
    """
    if method not in ("otsu", "kmeans"):
        raise ValueError(f"unknown CAM threshold method {method!r}; use otsu or kmeans")
    region = body_mask & np.asarray(positive, dtype=bool)[:, None, None]
    values = cams[region]
    if values.size == 0 or np.ptp(values) < 1e-6:
        return np.zeros(cams.shape, dtype=bool)
    cut = threshold_otsu(values) if method == "otsu" else threshold_isodata(values)
    mask = ndimage.binary_opening((cams > cut) & region, structure=FULL_3D)
    return keep_components(mask, lambda sizes: sizes * 3 >= sizes.max())
