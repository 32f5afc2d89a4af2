"""Cells in memory by index: cell indices in, tokenized `CellBatch`es out (built in loader workers),
in length-grouped batches that are the same global batches whatever the number of processes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from exceiver.data.cells import CellCounts
from exceiver.data.preprocess import GeneScaler
from exceiver.data.streams import rank_and_world_size
from exceiver.data.tokenizer import CellBatch, TokenizerConfig, make_batch


class CellIndexDataset(Dataset):
    """Items are cell indices; the collate function tokenizes a whole batch at once (vectorised)."""

    def __init__(self, rows: np.ndarray):
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> int:
        return int(self.rows[i])


class CellBatcher:
    """Collate function. With `salt=None` each batch draws fresh masks (training); a fixed salt
    gives every cell the same masks in every epoch (validation).

    Fresh salts come from (seed, loader worker, batch number), not from the global RNG: Lightning
    reseeds that when a distributed run starts, and then each process's half of a global batch
    would be masked unlike the same cells in a one-process run."""

    def __init__(self, cells: CellCounts, scaler: GeneScaler, tokenizer: TokenizerConfig, *,
                 masked: bool, salt: int | None = None, seed: int = 0):
        self.cells, self.scaler, self.tokenizer, self.masked, self.salt = cells, scaler, tokenizer, masked, salt
        self.seed, self.n_batches = seed, 0

    def __call__(self, rows: list[int]) -> CellBatch:
        salt = self.salt
        if salt is None:
            worker = get_worker_info()
            salt = int(np.random.default_rng([self.seed, worker.id if worker else 0, self.n_batches]).integers(2**62))
            self.n_batches += 1
        return make_batch(self.cells, np.asarray(rows), self.scaler, self.tokenizer, masked=self.masked, salt=salt)


class LengthGroupedSampler(Sampler[int]):
    """Cell order in which consecutive `batch_size` cells have similar numbers of expressed genes,
    so that batches carry little padding (on a mixed 9.9k-cell corpus, padding fell from 69% to 12%
    of tokens and training ran 2x faster).

    shuffle=True (training): each epoch, shuffled cells are cut into chunks, each chunk is sorted
    by length, and this process's batches are shuffled; every cell is seen once per epoch.
    shuffle=False (validation, inference): longest cells first. Under distributed training the
    sorted cells are dealt round-robin, so each process's share is also sorted; for training the
    order is padded with repeated cells so that every process runs the same number of steps.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0, chunk: int = 64,
                 distributed: bool = True):
        self.lengths, self.batch_size, self.shuffle = np.asarray(lengths), batch_size, shuffle
        self.seed, self.chunk, self.epoch, self.distributed = seed, chunk, 0, distributed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[np.ndarray]:
        """This process's batches of positions; only the last one may be short (so that the
        DataLoader, which cuts the order again, finds the same batches)."""
        n, size = len(self.lengths), self.batch_size
        rank, world = rank_and_world_size() if self.distributed else (0, 1)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(n)
            order = np.concatenate([order, order[: (-n) % world]])  # as many cells per process
            span = size * self.chunk * world
            for start in range(0, len(order), span):
                part = order[start:start + span]
                order[start:start + span] = part[np.argsort(self.lengths[part], kind="stable")]
        else:
            order = np.argsort(-self.lengths, kind="stable")
        mine = order[rank::world]
        batches = [mine[i:i + size] for i in range(0, len(mine), size)]
        if self.shuffle:
            n_full = len(mine) // size
            batches = [batches[i] for i in rng.permutation(n_full)] + batches[n_full:]
        return batches

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch.tolist()

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches())


def cell_loader(cells: CellCounts, rows: np.ndarray, batcher: CellBatcher, *, batch_size: int,
                shuffle: bool = False, seed: int = 0, num_workers: int = 0, distributed: bool = True) -> DataLoader:
    """Batches of `rows` of `cells`, grouped by length (see `LengthGroupedSampler`); with
    `distributed=False` this process sees every cell, even inside a distributed run."""
    sampler = LengthGroupedSampler(cells.n_genes_expressed[rows], batch_size, shuffle=shuffle, seed=seed,
                                   distributed=distributed)
    return DataLoader(
        CellIndexDataset(rows), batch_size=batch_size, sampler=sampler, collate_fn=batcher,
        num_workers=num_workers, persistent_workers=num_workers > 0,
    )
