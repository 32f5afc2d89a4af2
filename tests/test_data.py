"""Batching: length grouping, one pass over the cells per epoch, disjoint shares per process."""

import numpy as np
import pytest

from exceiver import data
from exceiver.data import LengthGroupedSampler, split_cells


@pytest.fixture
def lengths():
    return np.random.default_rng(0).integers(50, 5000, 1000)


def test_training_order_covers_every_cell_once_in_length_groups(lengths):
    sampler = LengthGroupedSampler(lengths, 64, shuffle=True, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(1000)) and len(sampler) == 1000
    batches = sampler.batches()
    assert all(len(b) == 64 for b in batches[:-1]) and len(batches[-1]) == 1000 % 64
    fill = np.mean([lengths[b].mean() / lengths[b].max() for b in batches])
    random_fill = np.mean([lengths[b].mean() / lengths[b].max() for b in np.array_split(np.random.default_rng(2).permutation(1000), 16)])
    assert fill > 0.9 and random_fill < 0.6


def test_epochs_reshuffle_reproducibly(lengths):
    sampler = LengthGroupedSampler(lengths, 64, shuffle=True, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second
    again = LengthGroupedSampler(lengths, 64, shuffle=True, seed=1)
    again.set_epoch(1)
    assert list(again) == second


def test_unshuffled_order_is_longest_first(lengths):
    order = list(LengthGroupedSampler(lengths, 64, shuffle=False))
    assert np.all(np.diff(lengths[order]) <= 0)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("n_cells", [1000, 40])
def test_processes_get_disjoint_shares(lengths, monkeypatch, shuffle, n_cells):
    lengths = lengths[:n_cells]
    shares = []
    for rank in range(3):
        monkeypatch.setattr(data, "_rank_and_world_size", lambda r=rank: (r, 3))
        sampler = LengthGroupedSampler(lengths, 64, shuffle=shuffle, seed=4)
        shares.append(sampler.batches())
    seen = np.concatenate([np.concatenate(s) for s in shares])
    assert all(len(s) >= 1 for s in shares)  # no process without a batch
    if shuffle:  # the same number of steps everywhere; every cell seen, at most 2 twice to even out
        assert len({len(s) for s in shares}) == 1 and set(seen.tolist()) == set(range(n_cells))
        assert len(seen) - n_cells == (-n_cells) % 3
    else:  # validation: each cell exactly once
        assert sorted(seen.tolist()) == list(range(n_cells))
    for share in shares:
        assert all(len(b) == 64 for b in share[:-1])
        if not shuffle:
            flat = np.concatenate(share)
            assert np.all(np.diff(lengths[flat]) <= 0)


def test_split_is_seeded_and_disjoint():
    train, val = split_cells(100, 0.1, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 100
    np.testing.assert_array_equal(split_cells(100, 0.1, seed=3)[1], val)
    assert not np.array_equal(split_cells(100, 0.1, seed=4)[1], val)


def test_inference_order_covers_every_cell_inside_a_distributed_run(monkeypatch):
    """Training shares cells out between processes; inference (distributed=False) must not, or
    each process would leave the other processes' cells unwritten."""
    monkeypatch.setattr(data, "_rank_and_world_size", lambda: (1, 2))
    lengths = np.arange(10)
    shared = LengthGroupedSampler(lengths, 4, shuffle=False)
    alone = LengthGroupedSampler(lengths, 4, shuffle=False, distributed=False)
    assert sorted(shared) == [0, 2, 4, 6, 8]  # this process's half
    assert sorted(alone) == list(range(10))
