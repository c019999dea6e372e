"""A DataLoader whose order depends only on (seed, epoch) and which Lightning can checkpoint.

Lightning saves `state_dict()` of training loaders that implement it and restores it on resume, so
a run resumed mid-epoch continues with exactly the batches the uninterrupted run would have seen.
The order never touches the global RNG, so restoring the RNG state (RNGStateCallback) is enough to
replay the diffusion noise too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSeededSampler(Sampler[int]):
    """A permutation drawn from a generator seeded by (seed, epoch); can start mid-epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start (and with the restored epoch on resume)."""
        self.epoch = epoch

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        yield from self.order()[start:]

    def __len__(self) -> int:
        return self.size


class ResumableDataLoader(DataLoader):
    """DataLoader with a (seed, epoch) order and state_dict/load_state_dict for mid-epoch resume.

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
        self.order_sampler = EpochSeededSampler(len(dataset), seed, shuffle)
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
        return {"epoch": self.order_sampler.epoch, "batches_yielded": self.batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.order_sampler.set_epoch(int(state["epoch"]))
        consumed = int(state["batches_yielded"])
        # A checkpoint taken on the last batch of an epoch resumes at the start of the next one.
        self.order_sampler.start = 0 if consumed >= len(self) else consumed * int(self.batch_size)
