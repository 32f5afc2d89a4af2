"""Batching: length grouping, one pass over the cells per epoch, disjoint shares per process."""

import numpy as np
import pytest

from conftest import synthetic_counts
from exceiver.data import loaders
from exceiver.data.corpus import build_corpus
from exceiver.data.datamodule import CellDataModule, validation_cells
from exceiver.data.loaders import LengthGroupedSampler
from exceiver.errors import ExceiverInputError
from exceiver.nn.config import pretraining_configs
from exceiver.data.training_cells import pretraining_data
from exceiver.train.config import TrainingConfig


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
        monkeypatch.setattr(loaders, "rank_and_world_size", lambda r=rank: (r, 3))
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


def test_split_is_seeded_and_keeps_a_cell_on_each_side():
    validation = validation_cells(10_000, 0.1, seed=3)
    assert abs(validation.mean() - 0.1) < 0.01
    np.testing.assert_array_equal(validation_cells(10_000, 0.1, seed=3), validation)
    assert (validation_cells(10_000, 0.1, seed=4) != validation).mean() > 0.1
    for n in (2, 3, 5):  # too few cells for the fraction: still one cell on each side
        small = validation_cells(n, 0.1, seed=0)
        assert 1 <= small.sum() < n
    with pytest.raises(ExceiverInputError, match="at least 2 cells"):
        validation_cells(1, 0.1, seed=0)


def _cells_seen(data: CellDataModule) -> tuple[list[int], list[int]]:
    """Cell rows of one training epoch and of one validation round."""
    return [sorted(np.concatenate([b.cells.numpy() for b in loader]).tolist())
            for loader in (data.train_dataloader(), data.val_dataloader())]


def test_in_memory_and_corpus_pretraining_see_the_same_cells(tmp_path):
    """The same files and seed: the same vocabulary, dropped cells, split and scaler, whether the
    files are read into memory or converted to an on-disk corpus first."""
    first, second = synthetic_counts(n_cells=150, seed=1), synthetic_counts(n_cells=90, seed=2, prefix="H")
    first.X[7] = 0  # a cell without counts: dropped either way
    paths = [tmp_path / "first.h5ad", tmp_path / "second.h5ad"]
    for adata, path in zip((first, second), paths):
        adata.write_h5ad(path)
    build_corpus(paths, tmp_path / "corpus", shard_cells=64, progress=False)
    settings = TrainingConfig(val_fraction=0.2, seed=5)
    _, tokenizer, _ = pretraining_configs("default")
    seen = []
    for data in (paths, tmp_path / "corpus"):
        cells = pretraining_data(data, settings, progress=False)
        module = CellDataModule(cells.source, cells.scaler, tokenizer, cells.validation, batch_size=16,
                                genes=cells.scaler.n_expressed > 0)
        seen.append((cells.vocab, cells.scaler.mean, *_cells_seen(module)))
    (vocab, mean, train, val), (corpus_vocab, corpus_mean, corpus_train, corpus_val) = seen
    assert vocab == corpus_vocab and len(train) + len(val) == 239
    np.testing.assert_allclose(mean, corpus_mean, rtol=1e-6)
    assert train == corpus_train and val == corpus_val and not set(train) & set(val)


def test_inference_order_covers_every_cell_inside_a_distributed_run(monkeypatch):
    """Training shares cells out between processes; inference (distributed=False) must not, or
    each process would leave the other processes' cells unwritten."""
    monkeypatch.setattr(loaders, "rank_and_world_size", lambda: (1, 2))
    lengths = np.arange(10)
    shared = LengthGroupedSampler(lengths, 4, shuffle=False)
    alone = LengthGroupedSampler(lengths, 4, shuffle=False, distributed=False)
    assert sorted(shared) == [0, 2, 4, 6, 8]  # this process's half
    assert sorted(alone) == list(range(10))
