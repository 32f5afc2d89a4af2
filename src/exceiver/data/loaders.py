"""Cells in memory by index: cell indices in, tokenized `CellBatch`es out (built in loader workers),
in length-grouped batches that are the same global batches whatever the number of processes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from exceiver.data.cells import CellCounts
from exceiver.data.preprocess import GeneScaler
from exceiver.data.streams import rank_and_world_size
from exceiver.data.tokenizer import CellBatch, TokenizerConfig, make_batch


class CellIndexDataset(Dataset):
    """Items are cell indices (with `paired`, training's (position, salt) pairs become (cell
    index, salt)); the collate function tokenizes a whole batch at once (vectorised)."""

    def __init__(self, rows: np.ndarray, *, paired: bool = False):
        self.rows, self.paired = np.asarray(rows, dtype=np.int64), paired

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item):
        if self.paired:
            position, salt = item
            return int(self.rows[position]), salt
        return int(self.rows[item])


class CellBatcher:
    """Collate function. With a fixed `salt` every cell gets the same masks in every pass
    (validation, inference); without one (training) each item is a (row, salt) pair from
    `TrainingBatches`, whose salts depend only on (seed, epoch, batch number): not on the global
    RNG (Lightning reseeds it when a distributed run starts), not on loader workers, and not on
    where an interrupted run was resumed."""

    def __init__(self, cells: CellCounts, scaler: GeneScaler, tokenizer: TokenizerConfig, *,
                 masked: bool, salt: int | None = None):
        self.cells, self.scaler, self.tokenizer, self.masked, self.salt = cells, scaler, tokenizer, masked, salt

    def __call__(self, items: list) -> CellBatch:
        if self.salt is None:
            rows, salt = [row for row, _ in items], items[0][1]
        else:
            rows, salt = items, self.salt
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


class TrainingBatches(Sampler[list]):
    """Batch sampler of training: the batches of a shuffling `LengthGroupedSampler`, each cell
    paired with its batch's mask salt, drawn from (seed, epoch, batch number). `skip(n)` makes
    the next pass start at its batch n: a run resumed mid-epoch sees the rest of the epoch, with
    the masks, that the uninterrupted run saw."""

    def __init__(self, sampler: LengthGroupedSampler):
        self.sampler, self.skipped = sampler, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before each epoch
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def skip(self, n_batches: int) -> None:
        self.skipped = n_batches

    def __iter__(self) -> Iterator[list]:
        batches = self.sampler.batches()
        salts = np.random.default_rng([self.sampler.seed, self.sampler.epoch]).integers(2**62, size=len(batches))
        start, self.skipped = self.skipped, 0
        for batch, salt in zip(batches[start:], salts[start:].tolist()):
            yield [(row, salt) for row in batch.tolist()]

    def __len__(self) -> int:
        return len(self.sampler.batches())


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch: Lightning stores `state_dict()` in each
    checkpoint (the epoch and how many of its batches training consumed, read from `consumed`)
    and hands it back on resume, and the next pass then skips those batches."""

    def __init__(self, dataset: Dataset, batch_sampler: TrainingBatches, *, consumed, **options):
        super().__init__(dataset, batch_sampler=batch_sampler, **options)
        self.consumed = consumed

    def state_dict(self) -> dict:
        return {"epoch": self.batch_sampler.epoch, "batches": int(self.consumed())}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.skip(int(state["batches"]))


def cell_loader(cells: CellCounts, rows: np.ndarray, batcher: CellBatcher, *, batch_size: int,
                num_workers: int = 0, distributed: bool = True) -> DataLoader:
    """Batches of `rows` of `cells`, longest cells first (validation, inference; see
    `LengthGroupedSampler`); with `distributed=False` this process sees every cell, even inside
    a distributed run."""
    sampler = LengthGroupedSampler(cells.n_genes_expressed[rows], batch_size, shuffle=False, distributed=distributed)
    return DataLoader(
        CellIndexDataset(rows), batch_size=batch_size, sampler=sampler, collate_fn=batcher,
        num_workers=num_workers, persistent_workers=num_workers > 0,
    )


def training_loader(cells: CellCounts, rows: np.ndarray, batcher: CellBatcher, *, batch_size: int, seed: int,
                    consumed, num_workers: int = 0) -> ResumableLoader:
    """Shuffled, length-grouped training batches of `rows` (the same global batches whatever the
    number of processes), resumable mid-epoch; `consumed()` says how many batches of the current
    epoch training has taken (read when a checkpoint is saved)."""
    sampler = LengthGroupedSampler(cells.n_genes_expressed[rows], batch_size, shuffle=True, seed=seed)
    return ResumableLoader(CellIndexDataset(rows, paired=True), TrainingBatches(sampler), consumed=consumed,
                           collate_fn=batcher, num_workers=num_workers, persistent_workers=num_workers > 0)
