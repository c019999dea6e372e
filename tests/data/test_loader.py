"""The resumable loader under data parallelism: disjoint shards of one (seed, epoch) permutation,
exact mid-epoch resume per rank, and a clear refusal to resume mid-epoch with another world size."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from sparse_dm.data import loader as loader_module
from sparse_dm.data.loader import ResumableDataLoader

SIZE, BATCH, SEED = 21, 2, 3


def make_loader(monkeypatch, world_size: int, rank: int) -> ResumableDataLoader:
    monkeypatch.setattr(loader_module, "world", lambda: (world_size, rank))
    return ResumableDataLoader(TensorDataset(torch.arange(SIZE)), batch_size=BATCH, seed=SEED)


def epoch_items(loader: ResumableDataLoader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [int(i) for (batch,) in loader for i in batch]


def test_ranks_get_disjoint_shards_of_the_single_process_order(monkeypatch):
    single = epoch_items(make_loader(monkeypatch, 1, 0), epoch=1)
    assert sorted(single) == list(range(SIZE))
    shards = [epoch_items(make_loader(monkeypatch, 2, rank), epoch=1) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 11  # padded to a multiple of the world size
    assert shards[0] == single[0::2] and shards[1] == (single + single[:1])[1::2]
    assert set(shards[0]) | set(shards[1]) == set(range(SIZE))
    assert epoch_items(make_loader(monkeypatch, 2, 0), epoch=2) != shards[0]  # reshuffled per epoch


@pytest.mark.parametrize("rank", [0, 1])
def test_mid_epoch_resume_continues_each_rank_shard(monkeypatch, rank):
    full = make_loader(monkeypatch, 2, rank)
    full.set_epoch(4)
    iterator = iter(full)
    seen = [next(iterator) for _ in range(2)]
    state = full.state_dict()
    rest = [int(i) for (batch,) in iterator for i in batch]

    resumed = make_loader(monkeypatch, 2, rank)
    resumed.load_state_dict(state)
    assert [int(i) for (batch,) in resumed for i in batch] == rest and len(seen) == 2


def test_mid_epoch_resume_with_another_world_size_is_refused(monkeypatch):
    two = make_loader(monkeypatch, 2, 0)
    iterator = iter(two)
    next(iterator)
    with pytest.raises(ValueError, match="mid-epoch with 2 processes"):
        make_loader(monkeypatch, 1, 0).load_state_dict(two.state_dict())
