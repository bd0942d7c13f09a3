"""The 3D U-Net trained on pseudo-labels (METHOD.md §B step 6): MONAI UNet, Dice+CE, SGD with poly decay.

Training sees random patches (half centred on foreground, half on background) with random 90° rotations in
the axial plane and flips; inference slides a window of the same size over the whole volume (the volume is
never resized, so small lesions survive).

An epoch draws one patch per training case (cases in a random order, padded with repeats to a whole number of
batches). Every random choice is a function of (seed, epoch, position in the epoch), so training resumed
from an epoch checkpoint, or split over DistributedDataParallel ranks, repeats an uninterrupted single-process
run. Under DDP, ``batch_size`` is per process: the global batch is ``batch_size × world size``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd, RandRotate90d, SpatialPadd
from monai.utils import convert_to_tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, no_progress
from ..protocols import SegmentationNetwork
from ..writers import atomic_path, write_failed
from . import distributed

LEARNING_RATE = 0.01
POLY_POWER = 0.9
DOWNSAMPLINGS = 4  # stride-2 levels of the UNet: patch sides must be multiples of 2**4
CHECKPOINT = "last.pt"


def build_unet(seed: int = 0) -> UNet:
    """The paper's U-Net: channels 16-32-64-128-256, stride 2, instance norm; logits (B, 2, K, J, I) of
    images (B, 1, K, J, I). ``seed`` seeds the initialisation without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
                    strides=(2, 2, 2, 2), norm="instance")


def check_patch_size(patch_size: int) -> None:
    """Patch sides are multiples of 16 (four halvings), and at least 32: instance norm needs more than one
    voxel at the deepest level."""
    if patch_size < 2 * 2 ** DOWNSAMPLINGS or patch_size % 2 ** DOWNSAMPLINGS:
        raise InputError(f"--patch-size {patch_size}: use a multiple of {2 ** DOWNSAMPLINGS}, at least "
                         f"{2 * 2 ** DOWNSAMPLINGS} (the paper: 128)")


def patch_transforms(patch_size: int) -> Compose:
    """Random patch of ``patch_size``³ (padded first when the volume is smaller), rot90 in the axial
    (J, I) plane, flips along each axis; on dicts {"image", "label"} of (1, K, J, I) arrays."""
    keys = ("image", "label")
    return Compose([
        SpatialPadd(keys, spatial_size=(patch_size,) * 3),
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=(patch_size,) * 3, pos=1, neg=1,
                               num_samples=1),
        RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(1, 2)),
        *(RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)),
    ])


def epoch_order(count: int, global_batch: int, seed: int, epoch: int) -> np.ndarray:
    """The case indices of one epoch: a permutation, padded with its first entries to fill the last batch."""
    order = np.random.default_rng([seed, epoch]).permutation(count)
    steps = -(-count // global_batch)
    return np.resize(order, steps * global_batch)


def _sample(case: tuple, transforms: Compose, seed: int, epoch: int, position: int) -> tuple:
    image, label = case
    transforms.set_random_state(seed=int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0]))
    patch = transforms({"image": np.asarray(image)[None], "label": np.asarray(label)[None].astype(np.uint8)})[0]
    return (convert_to_tensor(patch["image"], track_meta=False),
            convert_to_tensor(patch["label"], track_meta=False))


class PatchStream(Dataset):
    """The patches one rank trains on from epoch ``first`` to the last, in training order: item n is the patch
    of epoch ``first + n // per_epoch`` at this rank's n-th position of that epoch (`epoch_order`), a pair
    (image (1, P, P, P) float32, label (1, P, P, P) uint8). Every patch is a function of (seed, epoch,
    position), so `DataLoader` workers may cut them in any order and process."""

    def __init__(self, cases: Sequence[tuple], patch_size: int, batch_size: int, seed: int, first: int,
                 epochs: int) -> None:
        self.cases, self.batch_size, self.seed, self.first, self.epochs = cases, batch_size, seed, first, epochs
        self.transforms = patch_transforms(patch_size)
        self.rank, self.global_batch = distributed.rank(), batch_size * distributed.world_size()
        self.steps = -(-len(cases) // self.global_batch)

    @property
    def per_epoch(self) -> int:
        return self.steps * self.batch_size

    def __len__(self) -> int:
        return (self.epochs - self.first) * self.per_epoch

    def __getitem__(self, n: int) -> tuple:
        epoch, k = self.first + n // self.per_epoch, n % self.per_epoch
        position = (k // self.batch_size) * self.global_batch + self.rank * self.batch_size + k % self.batch_size
        order = epoch_order(len(self.cases), self.global_batch, self.seed, epoch)
        return _sample(self.cases[order[position]], self.transforms, self.seed, epoch, position)


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` atomically: a kill never leaves half a file under ``path``, a failed write (a full disk)
    raises `WriteError` and leaves none either."""
    with atomic_path(path) as temporary:
        try:
            torch.save(state, temporary)
        except RuntimeError as error:  # its zip writer reports a short write so: "unexpected pos 576 vs 534"
            raise write_failed(path, str(error).strip().splitlines()[-1]) from error


def train_unet(cases: Sequence[tuple[np.ndarray, np.ndarray]], epochs: int, patch_size: int = 128,
               batch_size: int = 2, device: str | torch.device = "cpu", progress: ProgressCallback = no_progress,
               cancel: Optional[CancelToken] = None, seed: int = 0, checkpoint_dir: Optional[Path] = None,
               resume: bool = False, stage: str = "unet", loader_workers: int = 0) -> tuple[UNet, list[float]]:
    """Train a new U-Net on (image, label) pairs.

    Args:
        cases: (image (K, J, I) float32 pre-processed, label (K, J, I) bool) per case; sizes may differ. Any
            sequence: a lazy one reads a case when a patch is cut from it.
        epochs: passes over the cases (one random patch per case each).
        batch_size: patches per optimiser step (per process under DDP).
        checkpoint_dir: where ``last.pt`` (model, optimiser, finished epochs, losses) is written after each
            epoch (by rank 0); None for no checkpoints.
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        stage: the stage name given to ``progress(stage, epoch, epochs, "loss X", epoch=, loss=)``.
        loader_workers: processes cutting patches ahead of the optimiser (0: in this process). The patches,
            and so the trained weights, are the same for any number.

    Returns:
        ``(model, losses)``: the trained model (eval mode, on ``device``) and the mean loss of every epoch.
    """
    check_patch_size(patch_size)
    if not cases:
        raise InputError("no case to train the U-Net on")
    device = torch.device(device)
    model = build_unet(seed).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9, weight_decay=1e-4)
    losses: list[float] = []
    checkpoint = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if resume and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        losses = list(state["losses"])
    network = distributed.wrap(model)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    patches = PatchStream(cases, patch_size, batch_size, seed, len(losses), epochs)
    loader = DataLoader(patches, batch_size=batch_size, num_workers=loader_workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if loader_workers else None)
    batches = iter(loader)
    for epoch in range(len(losses), epochs):
        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE * (1 - epoch / epochs) ** POLY_POWER
        network.train()
        step_losses = []
        for _ in range(patches.steps):
            if cancel is not None:
                cancel.raise_if_cancelled()
            images, labels = next(batches)
            loss = loss_function(network(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step_losses.append(distributed.mean_over_ranks(loss.item()))
        losses.append(float(np.mean(step_losses)))
        if checkpoint is not None and distributed.is_main():
            save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "epoch": epoch + 1, "losses": losses, "patch_size": patch_size})
        progress(stage, epoch + 1, epochs, f"loss {losses[-1]:.4f}", epoch=epoch + 1, loss=losses[-1])
    return model.eval(), losses


def load_unet(path: str | Path, device: str | torch.device = "cpu") -> UNet:
    """A U-Net from a checkpoint written by `train_unet` (read with ``weights_only=True``)."""
    from ..models.loaders import load_checkpoint

    model = build_unet()
    model.load_state_dict(load_checkpoint(Path(path)))
    return model.to(device).eval()


@torch.no_grad()
def predict(model: SegmentationNetwork, image: np.ndarray, patch_size: int = 128,
            device: str | torch.device = "cpu", overlap: float = 0.5, progress: ProgressCallback = no_progress,
            cancel: Optional[CancelToken] = None) -> np.ndarray:
    """Foreground mask (K, J, I) bool of a pre-processed image (K, J, I) float32 by sliding-window inference
    (windows of ``patch_size``³ overlapping by ``overlap``, Gaussian-weighted, padded at the borders).
    Reports ``progress("apply", batches done, batches, "")`` and checks ``cancel`` before each batch of windows."""
    device = torch.device(device)
    model.to(device).eval()
    inputs = torch.tensor(np.asarray(image), dtype=torch.float32)[None, None].to(device)
    window_batch = 2
    batches = -(-_window_count(image.shape, patch_size, overlap) // window_batch)
    done = 0

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        nonlocal done
        if cancel is not None:
            cancel.raise_if_cancelled()
        logits = model(windows)
        done += 1
        progress("apply", done, batches, "")
        return logits

    progress("apply", 0, batches, "")
    logits = sliding_window_inference(inputs, roi_size=(patch_size,) * 3, sw_batch_size=window_batch,
                                      predictor=predictor, overlap=overlap, mode="gaussian")
    return (logits.argmax(dim=1)[0] == 1).cpu().numpy()


def _window_count(shape: Sequence[int], patch_size: int, overlap: float) -> int:
    """How many windows `sliding_window_inference` visits: per axis, windows start every
    ``int(patch_size * (1 - overlap))`` voxels (one window where the axis is no longer than a patch)."""
    step, count = max(int(patch_size * (1 - overlap)), 1), 1
    for size in shape:
        count *= 1 if size <= patch_size else -(-(size - patch_size) // step) + 1
    return count
