"""A DataLoader whose order depends only on (seed, epoch) and which Lightning can checkpoint.

Lightning saves `state_dict()` of training loaders that implement it and restores it on resume, so
a run resumed mid-epoch continues with exactly the batches the uninterrupted run would have seen.
The order never touches the global RNG, so restoring the RNG state (RNGStateCallback) is enough to
replay the diffusion noise too.

Under DDP each rank iterates its own shard of the same permutation (as DistributedSampler does:
padded to a multiple of the world size, rank r takes positions r, r + W, ...). The sampler is a
DistributedSampler, so Lightning keeps it instead of re-creating the loader with its own sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

SEED_STRIDE = 1_000_003  # epoch e of seed s draws its permutation from generator seed s * SEED_STRIDE + e


def world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group; (1, 0) outside distributed training."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSeededSampler(DistributedSampler):
    """This rank's shard of a permutation drawn from a generator seeded by (seed, epoch); can start
    mid-epoch. With one process it is the whole permutation."""

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True) -> None:
        num_replicas, rank = world()
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.size = len(dataset)  # type: ignore[arg-type]
        self.start = 0

    def order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + self.epoch)
            indices = torch.randperm(self.size, generator=generator).tolist()
        else:
            indices = list(range(self.size))
        padded = indices * math.ceil(self.total_size / max(self.size, 1))
        return padded[: self.total_size][self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        yield from self.order()[start:]

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """DataLoader with a (seed, epoch) order and state_dict/load_state_dict for mid-epoch resume.

    Build it after the process group is initialised (Lightning calls `train_dataloader()` then).
    Outside Lightning, call `set_epoch(epoch)` before each epoch (as with DistributedSampler).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        drop_last: bool = False,
    ) -> None:
        self.order_sampler = EpochSeededSampler(dataset, seed, shuffle)
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=self.order_sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            drop_last=drop_last,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(seed),
        )
        self.batches_yielded = 0

    def __iter__(self) -> Iterator[Any]:
        self.batches_yielded = self.order_sampler.start // int(self.batch_size)
        for batch in super().__iter__():
            self.batches_yielded += 1
            yield batch

    def set_epoch(self, epoch: int) -> None:
        self.order_sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.order_sampler.epoch,
            "batches_yielded": self.batches_yielded,
            "world_size": self.order_sampler.num_replicas,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        consumed = int(state["batches_yielded"])
        saved_world = int(state.get("world_size", 1))
        mid_epoch = 0 < consumed < len(self)
        if mid_epoch and saved_world != self.order_sampler.num_replicas:
            raise ValueError(
                f"this checkpoint was taken mid-epoch with {saved_world} processes; resuming it with "
                f"{self.order_sampler.num_replicas} would change which samples the epoch still holds. "
                f"Resume with {saved_world} processes (trainer.devices x trainer.num_nodes), or from a "
                "checkpoint taken at an epoch boundary."
            )
        self.order_sampler.set_epoch(int(state["epoch"]))
        # A checkpoint taken on the last batch of an epoch resumes at the start of the next one.
        self.order_sampler.start = consumed * int(self.batch_size) if mid_epoch else 0
