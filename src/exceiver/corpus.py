"""On-disk corpora: `.h5ad` files converted once into sharded CSR files in vocabulary space, read
by row ranges, so that pretraining on millions of cells needs memory for a buffer, not a corpus.

A corpus folder (`exceiver build-corpus FILES... --out DIR`):

| file | content |
|---|---|
| `corpus.json` | format, version, cell and gene counts, source datasets, shards |
| `genes.txt` | the gene vocabulary (union of the files' genes, or restricted to a list) |
| `measured.npy` | bool [datasets, genes]: which genes each dataset measured (unmeasured is not zero) |
| `shards/NNNNN.{indptr,genes,counts}.bin` | int64 row pointers, int32 gene ids, float32 counts |

Genes are aligned once per file while building; counts are checked and cells without counts in
the vocabulary's genes are dropped (and counted) then. A shard holds cells of one file only.
Pretraining splits the cells into training and validation by a seeded hash of their row number.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from exceiver.errors import ExceiverInputError
from exceiver.io import atomic_dir
from exceiver.model import ExceiverConfig
from exceiver.preprocess import GeneScaler, check_counts
from exceiver.stream import READ_CELLS, EpochLoader, H5adCells, OrderedBatches, ShuffledBatches, h5ad_var
from exceiver.tokenize import CellBatch, _mix
from exceiver.vocab import CellCounts, GeneVocab

log = logging.getLogger(__name__)

FORMAT, FORMAT_VERSION = "exceiver-corpus", 1
SHARD_CELLS = 65_536
ARRAYS = {"indptr": np.int64, "genes": np.int32, "counts": np.float32}


def is_corpus(path) -> bool:
    return isinstance(path, (str, Path)) and (Path(path) / "corpus.json").is_file()


def build_corpus(files: Sequence[str | Path], out: str | Path, *, genes=None, gene_key: str | None = None,
                 layer: str | None = None, shard_cells: int = SHARD_CELLS, overwrite: bool = False,
                 progress: bool = True) -> CorpusCells:
    """Convert `.h5ad` files of raw counts into a corpus folder, reading each file in row chunks
    (memory does not grow with the number of cells). genes, gene_key: as in `exceiver.pretrain`."""
    from exceiver.api import build_vocab, gene_keys  # api imports this module

    paths = [Path(f) for f in files]
    if not paths:
        raise ExceiverInputError("no datasets given")
    if shard_cells < 1:
        raise ExceiverInputError("shard_cells must be >= 1")
    stems = [p.stem for p in paths]
    names = [f"{s}#{i}" if stems.count(s) > 1 else s for i, s in enumerate(stems)]
    tables = [(name, h5ad_var(path)) for name, path in zip(names, paths)]
    keys = gene_keys(tables, gene_key)
    vocab = build_vocab(tables, genes, keys)
    sources = [H5adCells(p, vocab, gene_key=k, layer=layer, name=n) for p, k, n in zip(paths, keys, names)]
    with atomic_dir(out, overwrite=overwrite) as folder:
        (folder / "shards").mkdir()
        vocab.save(folder / "genes.txt")
        np.save(folder / "measured.npy", np.concatenate([s.measured for s in sources]))
        shards, datasets = [], []
        with tqdm(total=sum(s.n_cells for s in sources), unit="cell", desc="building corpus",
                  disable=not progress) as bar:
            for index, source in enumerate(sources):
                kept = _write_source(source, index, folder / "shards", shards, shard_cells, bar)
                datasets.append({"name": source.name, "file": str(source.path.resolve()),
                                 "n_cells": kept, "n_dropped": source.n_cells - kept})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "n_cells": sum(s["n_cells"] for s in shards),
                "n_genes": len(vocab), "layer": layer, "gene_key": gene_key, "datasets": datasets, "shards": shards}
        (folder / "corpus.json").write_text(json.dumps(meta, indent=1))
    log.info("wrote corpus %s: %s cells from %d dataset(s) in %d shard(s), %s genes", out,
             f"{meta['n_cells']:,}", len(datasets), len(shards), f"{len(vocab):,}")
    return CorpusCells(out)


def _write_source(source: H5adCells, index: int, folder: Path, shards: list[dict], shard_cells: int, bar) -> int:
    """Append one file's non-empty cells to new shards; returns how many were kept."""
    kept, shard = 0, None
    for start in range(0, source.n_cells, READ_CELLS):
        cells = source.read(start, min(start + READ_CELLS, source.n_cells))
        check_counts(cells, source.name)
        cells = cells.subset(np.flatnonzero(cells.n_genes_expressed > 0))
        written = 0
        while written < cells.n_cells:
            if shard is None or shard.n_cells == shard_cells:
                if shard is not None:
                    shards.append(shard.close())
                shard = _ShardWriter(folder, len(shards), index)
            take = min(shard_cells - shard.n_cells, cells.n_cells - written)
            shard.append(cells.counts[written:written + take])
            written += take
        kept += cells.n_cells
        bar.update(cells.n_cells + (min(start + READ_CELLS, source.n_cells) - start - cells.n_cells))
    if shard is not None:
        shards.append(shard.close())
    if kept == 0:
        raise ExceiverInputError(f"{source.name}: none of its {source.n_cells:,} cells has counts in the vocabulary's genes")
    if kept < source.n_cells:
        log.warning("%s: dropped %s of %s cells with no counts in the vocabulary's genes", source.name,
                    f"{source.n_cells - kept:,}", f"{source.n_cells:,}")
    return kept


class _ShardWriter:
    """Appends CSR rows to a shard's three files."""

    def __init__(self, folder: Path, number: int, dataset: int):
        self.name, self.dataset, self.n_cells, self.n_entries = f"{number:05d}", dataset, 0, 0
        self.files = {k: open(folder / f"{self.name}.{k}.bin", "wb") for k in ARRAYS}
        self.files["indptr"].write(np.zeros(1, np.int64).tobytes())

    def append(self, counts: sp.csr_matrix) -> None:
        self.files["indptr"].write((counts.indptr[1:].astype(np.int64) + self.n_entries).tobytes())
        self.files["genes"].write(counts.indices.astype(np.int32).tobytes())
        self.files["counts"].write(counts.data.astype(np.float32).tobytes())
        self.n_cells += counts.shape[0]
        self.n_entries += counts.nnz

    def close(self) -> dict:
        for f in self.files.values():
            f.close()
        return {"name": self.name, "dataset": self.dataset, "n_cells": self.n_cells, "n_entries": self.n_entries}


class CorpusCells:
    """A corpus folder as a cell source: `read(start, stop)` reads those rows from the shards
    with plain file reads (nothing stays mapped, so memory is what a read returns)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not is_corpus(self.folder):
            raise ExceiverInputError(f"{self.folder} is not a corpus folder (no corpus.json); "
                                     "build one with `exceiver build-corpus`")
        meta = json.loads((self.folder / "corpus.json").read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ExceiverInputError(f"{self.folder}/corpus.json is not an {FORMAT} v{FORMAT_VERSION} file")
        self.meta, self.shards = meta, meta["shards"]
        self.vocab = GeneVocab.load(self.folder / "genes.txt")
        self.measured = np.load(self.folder / "measured.npy")
        self.source_names = [d["name"] for d in meta["datasets"]]
        self.starts = np.cumsum([0] + [s["n_cells"] for s in self.shards])
        for shard in self.shards:
            for key, dtype in ARRAYS.items():
                path = self._path(shard, key)
                size = (shard["n_cells"] + 1 if key == "indptr" else shard["n_entries"]) * np.dtype(dtype).itemsize
                if not path.is_file() or path.stat().st_size != size:
                    raise ExceiverInputError(f"{path} is missing or truncated: rebuild the corpus")

    @property
    def n_cells(self) -> int:
        return int(self.starts[-1])

    def _path(self, shard: dict, key: str) -> Path:
        return self.folder / "shards" / f"{shard['name']}.{key}.bin"

    def blocks(self, size: int = READ_CELLS) -> np.ndarray:
        """(start, stop) row ranges of at most `size` cells that never span two shards."""
        return np.array([(a, min(a + size, b)) for a, b in zip(self.starts[:-1], self.starts[1:])
                         for a in range(int(a), int(b), size)], dtype=np.int64).reshape(-1, 2)

    def read(self, start: int, stop: int) -> CellCounts:
        parts, sources = [], []
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        for i in range(first, len(self.shards)):
            if self.starts[i] >= stop:
                break
            shard = self.shards[i]
            a, b = max(start, self.starts[i]) - self.starts[i], min(stop, self.starts[i + 1]) - self.starts[i]
            indptr = self._array(shard, "indptr", a, b + 1)
            genes = self._array(shard, "genes", indptr[0], indptr[-1])
            counts = self._array(shard, "counts", indptr[0], indptr[-1])
            parts.append(sp.csr_matrix((counts, genes, indptr - indptr[0]), shape=(b - a, len(self.vocab))))
            sources.append(np.full(b - a, shard["dataset"], dtype=np.int32))
        counts = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
        return CellCounts(counts, self.measured, np.concatenate(sources), np.arange(start, stop).astype(str),
                          self.source_names)

    def _array(self, shard: dict, key: str, start: int, stop: int) -> np.ndarray:
        dtype = np.dtype(ARRAYS[key])
        return np.fromfile(self._path(shard, key), dtype=dtype, count=int(stop - start),
                           offset=int(start) * dtype.itemsize)


def is_validation(rows: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """A seeded hash of the row number puts a cell in validation (about `val_fraction` of them)."""
    keys = _mix(np.asarray(rows).astype(np.uint64) ^ _mix(np.uint64(seed)))
    return (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53 < val_fraction


class _Split:
    """Picklable (for loader workers): True for the rows of training or of validation cells."""

    def __init__(self, val_fraction: float, seed: int, validation: bool):
        self.val_fraction, self.seed, self.validation = val_fraction, seed, validation

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return is_validation(rows, self.val_fraction, self.seed) == self.validation


class _TrainedGenes:
    """Picklable: keep only genes expressed in training (the others have untrained embeddings)."""

    def __init__(self, trained: np.ndarray):
        self.trained = trained

    def __call__(self, cells: CellCounts) -> CellCounts:
        return cells.keep_genes(self.trained)


class _KeptCells:
    """A source's cells where `keep(rows)` holds and that still have tokens after `prepare`."""

    def __init__(self, source, keep, prepare):
        self.source, self.keep, self.prepare, self.n_cells = source, keep, prepare, source.n_cells

    def read(self, start: int, stop: int) -> CellCounts:
        cells = self.prepare(self.source.read(start, stop))
        return cells.subset(np.flatnonzero(self.keep(np.arange(start, stop)) & (cells.n_genes_expressed > 0)))


class CorpusDataModule(L.LightningDataModule):
    """Training and validation batches streamed from a corpus folder (see `ShuffledBatches`)."""

    def __init__(self, corpus: CorpusCells, scaler: GeneScaler, config: ExceiverConfig, *, batch_size: int,
                 val_fraction: float, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.corpus, self.scaler, self.config = corpus, scaler, config
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.prepare = _TrainedGenes(scaler.n_expressed > 0)
        self.validation_cells = _Split(val_fraction, seed, validation=True)
        self.train = ShuffledBatches(corpus, scaler, config, blocks=corpus.blocks(),
                                     keep=_Split(val_fraction, seed, validation=False),
                                     batch_size=batch_size, seed=seed, prepare=self.prepare)
        self.train_rows = range(self.train.n_cells)  # Trainer settings read its length

    def transfer_batch_to_device(self, batch: CellBatch, device: torch.device, dataloader_idx: int) -> CellBatch:
        return batch.to(device)

    def train_dataloader(self) -> EpochLoader:
        return EpochLoader(self.train, num_workers=self.num_workers)

    def val_dataloader(self) -> EpochLoader:
        cells = _KeptCells(self.corpus, self.validation_cells, self.prepare)
        stream = OrderedBatches(cells, self.scaler, self.config, batch_size=self.batch_size, masked=True,
                                salt=self.seed + 1)
        return EpochLoader(stream, num_workers=self.num_workers)


def fit_scaler(corpus: CorpusCells, val_fraction: float, seed: int, progress: bool = True,
               ranks: bool = False) -> GeneScaler:
    """The scaler, fitted on the corpus's training cells in two streaming passes."""
    def training_chunks():
        for a, b in tqdm(corpus.blocks(), desc="fitting the scaler", unit="block", disable=not progress, leave=False):
            cells = corpus.read(int(a), int(b))
            yield cells.subset(np.flatnonzero(~is_validation(np.arange(a, b), val_fraction, seed)))

    return GeneScaler.fit_chunks(training_chunks, len(corpus.vocab), ranks=ranks)
