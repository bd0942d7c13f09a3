"""Two CPU processes (gloo), set up as ``torchrun`` sets them up, against one process.

What this shows: the ranks split the cases between them without overlap or loss and meet at a barrier; DDP
training with 1 patch per rank ends with bit-identical weights on both ranks, and matches single-process
training with the same global batch of 2 (same seeds, same patches) up to float rounding: gradients are
averaged over ranks in another order than one process sums them, so equality is to a tolerance, not exact.
What it cannot show: NCCL on GPUs, or several nodes (same code path, other backend and launcher settings).
"""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from clisc.cohort import distributed
from clisc.cohort.unet import train_unet

EPOCHS = 3


def synthetic_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    cases = []
    for n in range(3):
        image = rng.normal(0, 0.3, (18, 22, 26)).astype(np.float32)
        label = np.zeros(image.shape, bool)
        label[5:11, 6:12, 8 + n:16 + n] = True
        image[label] += 2
        cases.append((image, label))
    return cases


def worker(rank: int, world_size: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init_from_env(torch.device("cpu"))
    try:
        for case in distributed.shard([f"case{n}" for n in range(5)]):
            with open(os.path.join(folder, f"{case}.rank{rank}"), "w"):
                pass
        distributed.barrier()
        seen = sorted(os.listdir(folder))  # every rank sees every rank's files after the barrier
        model, losses = train_unet(synthetic_cases(), EPOCHS, patch_size=32, batch_size=1, seed=5)
        torch.save({"model": model.state_dict(), "losses": losses, "seen": seen},
                   os.path.join(folder, f"result{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(2, free_port(), str(folder)), nprocs=2, join=True)
    return [torch.load(folder / f"result{rank}.pt", weights_only=True) for rank in range(2)]


def test_cases_are_sharded_over_ranks_and_all_files_are_seen_after_the_barrier(two_ranks):
    files = [f"case{n}.rank{n % 2}" for n in range(5)]
    for result in two_ranks:
        assert sorted(result["seen"]) == sorted(files)


def test_ddp_ranks_end_identical_and_match_single_process_training(two_ranks):
    first, second = two_ranks
    assert first["losses"] == second["losses"]
    for name, value in first["model"].items():
        assert torch.equal(value, second["model"][name]), name

    model, losses = train_unet(synthetic_cases(), EPOCHS, patch_size=32, batch_size=2, seed=5)
    np.testing.assert_allclose(first["losses"], losses, rtol=1e-4)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(first["model"][name], value, rtol=1e-3, atol=1e-5, msg=name)


def test_without_torchrun_everything_is_one_process():
    model = torch.nn.Linear(1, 1)
    assert distributed.wrap(model) is model
    assert (distributed.rank(), distributed.world_size(), distributed.shard([1, 2, 3])) == (0, 1, [1, 2, 3])
    assert distributed.mean_over_ranks(2.5) == 2.5
