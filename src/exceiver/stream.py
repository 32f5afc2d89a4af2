"""Cells streamed from disk in row ranges: `.h5ad` files read without loading their matrix, and
loaders that tokenize them in worker processes, so memory follows a chunk of cells, not a corpus.

A cell source is anything with `n_cells` and `read(start, stop) -> CellCounts` (cells already in
vocabulary space): `H5adCells` here, `exceiver.corpus.CorpusCells` for converted corpora. Genes
are aligned once per source; reading a range only re-indexes its non-zero entries.

Each distributed process and each loader worker reads its own part of the cells:
- `OrderedBatches` (inference): chunk i belongs to worker i mod (processes x workers); batches
  carry the cells' row numbers, so results are written where they belong;
- `ShuffledBatches` (training): blocks of cells in a seeded random order per epoch, each process
  a contiguous equal share of that order (padded by wrapping around, so that every process runs
  the same number of steps), each worker a batch-aligned part of it, shuffled again in a buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from exceiver.errors import ExceiverInputError
from exceiver.model import ExceiverConfig
from exceiver.preprocess import GeneScaler
from exceiver.tokenize import CellBatch, make_batch
from exceiver.vocab import CellCounts, GeneVocab, gene_alignment, to_vocabulary

READ_CELLS = 4096  # cells read from disk at a time (inference chunks, training blocks)


class H5adCells:
    """The cells of one `.h5ad` file, read from disk in row ranges (X or a layer, sparse or dense)
    and aligned to `vocab` once, from `var`. Each process opens its own file handle."""

    def __init__(self, path: str | Path, vocab: GeneVocab, *, gene_key: str | None = None,
                 layer: str | None = None, name: str | None = None):
        self.path, self.layer, self.name = Path(path), layer, name or Path(path).stem
        self.n_genes = len(vocab)
        with _open_h5ad(self.path) as file:
            self.ids, self.measured = gene_alignment(_var_only(file), vocab, gene_key=gene_key, name=self.name)
            self.n_cells = _matrix(file, layer).shape[0]
        self._file: h5py.File | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}  # h5py handles do not cross processes

    def read(self, start: int, stop: int) -> CellCounts:
        if self._file is None:
            self._file = _open_h5ad(self.path)
        rows = _matrix(self._file, self.layer)[start:stop]
        rows = sp.csr_matrix(rows) if sp.issparse(rows) else sp.csr_matrix(np.asarray(rows))
        index = self._file["obs"][self._file["obs"].attrs["_index"]]
        names = np.asarray(index.asstr()[start:stop] if index.dtype.kind in "OS" else index[start:stop]).astype(str)
        return CellCounts(to_vocabulary(rows, self.ids, self.n_genes), self.measured,
                          np.zeros(stop - start, dtype=np.int32), names, [self.name])


def h5ad_var(path: str | Path) -> ad.AnnData:
    """An AnnData holding only the `var` table of an `.h5ad` file (for vocabularies, alignment)."""
    with _open_h5ad(Path(path)) as file:
        return _var_only(file)


def _open_h5ad(path: Path) -> h5py.File:
    if not path.is_file():
        raise ExceiverInputError(f"dataset {path} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ExceiverInputError(f"cannot read {path} as an .h5ad file ({err})") from err


def _var_only(file: h5py.File) -> ad.AnnData:
    return ad.AnnData(var=ad.io.read_elem(file["var"]))


def _matrix(file: h5py.File, layer: str | None):
    """X or a layer as something that slices rows from disk."""
    if layer is None:
        element = file["X"] if "X" in file else None
        if element is None:
            raise ExceiverInputError(f"{file.filename} has no expression matrix (X is None)")
    else:
        layers = list(file["layers"]) if "layers" in file else []
        if layer not in layers:
            raise ExceiverInputError(f"layer {layer!r} is not in the dataset; available layers: {layers}")
        element = file["layers"][layer]
    return ad.io.sparse_dataset(element) if isinstance(element, h5py.Group) else element


def _rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Stream(IterableDataset):
    """Shared by the streams: tokenizer settings, and where this process and worker stand."""

    def __init__(self, source, scaler: GeneScaler, config: ExceiverConfig, *, batch_size: int, masked: bool,
                 salt: int = 0, prepare: Callable[[CellCounts], CellCounts] | None = None, distributed: bool = True):
        self.source, self.scaler, self.batch_size, self.prepare = source, scaler, batch_size, prepare
        self.salt = salt
        self.distributed, self.epoch = distributed, 0
        self.rank, self.world = 0, 1
        self.kwargs = dict(
            pad_id=config.n_genes, max_tokens=config.max_tokens, all_genes=config.paper_compatible,
            depth_tokens=config.depth_tokens,
            ranks=config.value_encoding == "rank",
            mask_fraction=config.mask_fraction if masked else 0.0,
            zero_query_ratio=config.zero_query_ratio if masked else 0.0,
        )

    def start_epoch(self, epoch: int) -> None:
        """Called in the main process before each pass (workers receive a copy made after it)."""
        self.epoch = epoch
        self.rank, self.world = _rank_and_world_size() if self.distributed else (0, 1)

    def _read(self, start: int, stop: int) -> CellCounts:
        cells = self.source.read(start, stop)
        return self.prepare(cells) if self.prepare else cells

    def _batches(self, cells: CellCounts, positions: list[np.ndarray], source_rows: np.ndarray,
                 salt: Callable[[int], int]) -> Iterator[CellBatch]:
        """Tokenized batches of `cells` at `positions`; `batch.cells` are their source rows."""
        for i, rows in enumerate(positions):
            batch = make_batch(cells, rows, self.scaler, salt=salt(i), **self.kwargs)
            yield replace(batch, cells=torch.from_numpy(source_rows[rows].astype(np.int64)))


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class OrderedBatches(_Stream):
    """Cells in chunks of `READ_CELLS`, longest first within a chunk, masked (validation) or not
    (inference), with fixed masks (`salt`); `batch.cells` are row numbers in the source as long
    as `prepare`, which checks or filters each chunk's cells, keeps every row."""

    def __iter__(self) -> Iterator[CellBatch]:
        worker, n_workers = _worker()
        share, shares = self.rank * n_workers + worker, self.world * n_workers
        for start in range(share * READ_CELLS, self.source.n_cells, shares * READ_CELLS):
            cells = self._read(start, min(start + READ_CELLS, self.source.n_cells))
            order = np.argsort(-cells.n_genes_expressed, kind="stable")
            positions = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            yield from self._batches(cells, positions, np.arange(start, start + cells.n_cells), lambda i: self.salt)


class ShuffledBatches(_Stream):
    """Training batches from the cells of `blocks` ((start, stop) row ranges of the source) whose
    `keep(rows)` is True: each epoch a seeded random block order, this process's equal share of
    it, this worker's part of that, shuffled in a buffer of `buffer_cells` cells and grouped by
    length there (little padding). Every kept cell is seen once per epoch (a few twice, to even
    out the processes). Masks come from (seed, epoch, process, worker, batch)."""

    def __init__(self, source, scaler: GeneScaler, config: ExceiverConfig, *, blocks: np.ndarray,
                 keep: Callable[[np.ndarray], np.ndarray], batch_size: int, seed: int, buffer_cells: int = 8192,
                 prepare: Callable[[CellCounts], CellCounts] | None = None):
        super().__init__(source, scaler, config, batch_size=batch_size, masked=True, prepare=prepare)
        self.blocks, self.keep, self.seed = np.asarray(blocks, dtype=np.int64), keep, seed
        self.buffer_cells = max(1, buffer_cells // batch_size) * batch_size
        self.block_cells = np.array([int(keep(np.arange(a, b)).sum()) for a, b in self.blocks], dtype=np.int64)
        if not self.block_cells.sum():
            raise ExceiverInputError("no training cells in the corpus")

    @property
    def n_cells(self) -> int:
        return int(self.block_cells.sum())

    def _share(self) -> int:
        return math.ceil(self.n_cells / self.world)

    def __len__(self) -> int:
        """Batches per epoch in this process (the same in every process)."""
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
    depend on it); workers are started afresh each pass, with the updated stream."""

    def __init__(self, stream: _Stream, *, num_workers: int = 0):
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False)
        self.passes = 0

    def __iter__(self):
        self.dataset.start_epoch(self.passes)
        self.passes += 1
        return super().__iter__()
