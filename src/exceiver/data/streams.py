"""Token batches streamed from a cell source in row ranges, tokenized in loader workers, so that
memory follows a chunk of cells, not a corpus.

Each distributed process and each loader worker reads its own part of the cells:
- `OrderedBatches` (validation, inference): chunk i belongs to worker i mod (processes x workers);
  batches carry the cells' row numbers, so results are written where they belong;
- `ShuffledBatches` (training): blocks of cells in a seeded random order per epoch, each process
  a contiguous equal share of that order (padded by wrapping around, so that every process runs
  the same number of steps), each worker a batch-aligned part of it, shuffled again in a buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from exceiver.data.cells import CellCounts
from exceiver.data.preprocess import GeneScaler
from exceiver.data.sources import READ_CELLS
from exceiver.data.tokenizer import CellBatch, TokenizerConfig, make_batch
from exceiver.errors import ExceiverInputError


def rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Stream(IterableDataset):
    """Shared by the streams: tokenizer settings, and where this process and worker stand."""

    def __init__(self, source, scaler: GeneScaler, tokenizer: TokenizerConfig, *, batch_size: int, masked: bool,
                 salt: int = 0, prepare: Callable[[CellCounts], CellCounts] | None = None, distributed: bool = True):
        self.source, self.scaler, self.batch_size, self.prepare = source, scaler, batch_size, prepare
        self.tokenizer, self.masked, self.salt = tokenizer, masked, salt
        self.distributed, self.epoch = distributed, 0
        self.rank, self.world = 0, 1

    def start_epoch(self, epoch: int) -> None:
        """Called in the main process before each pass (workers receive a copy made after it)."""
        self.epoch = epoch
        self.rank, self.world = rank_and_world_size() if self.distributed else (0, 1)

    def _read(self, start: int, stop: int) -> CellCounts:
        cells = self.source.read(start, stop)
        return self.prepare(cells) if self.prepare else cells

    def _batches(self, cells: CellCounts, positions: list[np.ndarray], source_rows: np.ndarray,
                 salt: Callable[[int], int]) -> Iterator[CellBatch]:
        """Tokenized batches of `cells` at `positions`; `batch.cells` are their source rows."""
        for i, rows in enumerate(positions):
            batch = make_batch(cells, rows, self.scaler, self.tokenizer, masked=self.masked, salt=salt(i))
            yield replace(batch, cells=torch.from_numpy(source_rows[rows].astype(np.int64)))


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class OrderedBatches(_Stream):
    """Cells in chunks of `READ_CELLS`, longest first within a chunk, masked (validation) or not
    (inference), with fixed masks (`salt`); `batch.cells` are row numbers in the source.

    keep: validation reads only the rows where `keep(rows)` holds, and of those the cells that
    `prepare` leaves with tokens; without it (inference) every row is read, and `prepare` must
    keep every row (it refuses empty cells rather than dropping them)."""

    def __init__(self, source, scaler: GeneScaler, tokenizer: TokenizerConfig, *, batch_size: int, masked: bool,
                 salt: int = 0, prepare: Callable[[CellCounts], CellCounts] | None = None, distributed: bool = True,
                 keep: Callable[[np.ndarray], np.ndarray] | None = None):
        super().__init__(source, scaler, tokenizer, batch_size=batch_size, masked=masked, salt=salt, prepare=prepare,
                         distributed=distributed)
        self.keep = keep

    def __iter__(self) -> Iterator[CellBatch]:
        worker, n_workers = _worker()
        share, shares = self.rank * n_workers + worker, self.world * n_workers
        for start in range(share * READ_CELLS, self.source.n_cells, shares * READ_CELLS):
            cells = self._read(start, min(start + READ_CELLS, self.source.n_cells))
            rows = np.arange(start, start + cells.n_cells)
            if self.keep is not None:
                kept = np.flatnonzero(self.keep(rows) & (cells.n_genes_expressed > 0))
                cells, rows = cells.subset(kept), rows[kept]
            order = np.argsort(-cells.n_genes_expressed, kind="stable")
            positions = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            yield from self._batches(cells, positions, rows, lambda i: self.salt)


class ShuffledBatches(_Stream):
    """Training batches from the cells of `blocks` ((start, stop) row ranges of the source) whose
    `keep(rows)` is True: each epoch a seeded random block order, this process's equal share of
    it, this worker's part of that, shuffled in a buffer of `buffer_cells` cells and grouped by
    length there (little padding). Every kept cell is seen once per epoch (a few twice, to even
    out the processes). Masks come from (seed, epoch, process, worker, batch)."""

    def __init__(self, source, scaler: GeneScaler, tokenizer: TokenizerConfig, *, blocks: np.ndarray,
                 keep: Callable[[np.ndarray], np.ndarray], batch_size: int, seed: int, buffer_cells: int = 8192,
                 prepare: Callable[[CellCounts], CellCounts] | None = None, masked: bool = True):
        super().__init__(source, scaler, tokenizer, batch_size=batch_size, masked=masked, prepare=prepare)
        self.blocks, self.keep, self.seed = np.asarray(blocks, dtype=np.int64), keep, seed
        self.buffer_cells = max(1, buffer_cells // batch_size) * batch_size
        self.block_cells = np.array([int(keep(np.arange(a, b)).sum()) for a, b in self.blocks], dtype=np.int64)
        if not self.block_cells.sum():
            raise ExceiverInputError("no training cells in the data")

    @property
    def n_cells(self) -> int:
        return int(self.block_cells.sum())

    def _share(self) -> int:
        return math.ceil(self.n_cells / self.world)

    def __len__(self) -> int:
        """Batches per epoch in this process (the same in every process). Lightning asks before
        the first pass (to plan the schedule), so the world size is read here too."""
        if self.distributed:
            self.rank, self.world = rank_and_world_size()
        return math.ceil(self._share() / self.batch_size)

    def __iter__(self) -> Iterator[CellBatch]:
        worker, n_workers = _worker()
        n_batches = len(self)
        first, last = n_batches * worker // n_workers, n_batches * (worker + 1) // n_workers
        offset = self.rank * self._share()
        start = offset + first * self.batch_size
        stop = offset + min(last * self.batch_size, self._share())
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        salts = iter(rng.integers(2**62, size=max(last - first, 0)).tolist())
        pending: list[tuple[CellCounts, np.ndarray]] = []
        n_pending = 0
        for piece in self._pieces(start, stop):
            pending.append(piece)
            n_pending += piece[0].n_cells
            while n_pending >= self.buffer_cells:
                cells, rows = CellCounts.concat([c for c, _ in pending]), np.concatenate([r for _, r in pending])
                head, rest = np.arange(self.buffer_cells), np.arange(self.buffer_cells, cells.n_cells)
                yield from self._shuffled(cells.subset(head), rows[head], rng, salts)
                pending, n_pending = [(cells.subset(rest), rows[rest])], len(rest)
        if n_pending:
            cells, rows = CellCounts.concat([c for c, _ in pending]), np.concatenate([r for _, r in pending])
            yield from self._shuffled(cells, rows, rng, salts)

    def _shuffled(self, cells: CellCounts, rows: np.ndarray, rng: np.random.Generator,
                  salts: Iterator[int]) -> Iterator[CellBatch]:
        order = rng.permutation(cells.n_cells)
        order = order[np.argsort(cells.n_genes_expressed[order], kind="stable")]
        positions = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        n_full = cells.n_cells // self.batch_size
        positions = [positions[i] for i in rng.permutation(n_full)] + positions[n_full:]
        yield from self._batches(cells, positions, rows, lambda i: next(salts))

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[CellCounts, np.ndarray]]:
        """Kept cells at positions [start, stop) of this epoch's block order (wrapping around),
        with their source rows."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.blocks))
        ends = np.cumsum(self.block_cells[order])
        position = start
        while position < stop:
            wrapped = position % self.n_cells
            i = int(np.searchsorted(ends, wrapped, side="right"))
            block_start = int(ends[i] - self.block_cells[order[i]])
            a, b = self.blocks[order[i]]
            kept = a + np.flatnonzero(self.keep(np.arange(a, b)))
            cells = self._read(int(a), int(b)).subset(kept - a)
            take = min(cells.n_cells - (wrapped - block_start), stop - position)
            part = np.arange(wrapped - block_start, wrapped - block_start + take)
            yield cells.subset(part), kept[part]
            position += take


class EpochLoader(DataLoader):
    """A DataLoader over a `_Stream` that tells it which pass this is (its shuffle and masks
    depend on it); workers are started afresh each pass, with the updated stream.

    For training it is resumable mid-epoch (`consumed()` says how many batches of the current
    pass training took): Lightning stores `state_dict()` in each checkpoint and hands it back on
    resume; the next pass is then that epoch, and its batches up to there are read and dropped
    (a stream cannot seek, and its order and masks depend only on seed, epoch, process and worker)."""

    def __init__(self, stream: _Stream, *, num_workers: int = 0, consumed: Callable[[], int] | None = None):
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False)
        self.passes, self.consumed, self.skipped = 0, consumed, 0
        if consumed is not None:  # Lightning resumes loaders that have these two methods
            self.state_dict = self._state_dict
            self.load_state_dict = self._load_state_dict

    def _state_dict(self) -> dict:
        return {"epoch": self.passes - 1, "batches": int(self.consumed())}

    def _load_state_dict(self, state: dict) -> None:
        self.passes, self.skipped = int(state["epoch"]), int(state["batches"])

    def __iter__(self):
        self.dataset.start_epoch(self.passes)
        self.passes += 1
        batches = super().__iter__()
        skipped, self.skipped = self.skipped, 0
        for _ in range(skipped):
            next(batches, None)
        return batches
