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
the vocabulary's genes are dropped (and counted) then, as `exceiver.data.preprocess.prepare_cells`
drops them from data in memory. A shard holds cells of one file only. Pretraining splits the cells
into training and validation by the same rule as data in memory (`exceiver.data.datamodule.validation_cells`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from exceiver.data.cells import CellCounts
from exceiver.data.preprocess import GeneScaler, prepare_cells, report_dropped
from exceiver.data.sources import READ_CELLS, H5adCells, h5ad_var
from exceiver.data.vocab import GeneVocab, build_vocab, gene_keys
from exceiver.errors import ExceiverInputError, option
from exceiver.outputs import atomic_dir
from exceiver.progress import progress_bar

log = logging.getLogger(__name__)

FORMAT, FORMAT_VERSION = "exceiver-corpus", 1
SHARD_CELLS = 65_536
ARRAYS = {"indptr": np.int64, "genes": np.int32, "counts": np.float32}


def is_corpus(path) -> bool:
    return isinstance(path, (str, Path)) and (Path(path) / "corpus.json").is_file()


def build_corpus(files: Sequence[str | Path], out: str | Path, *, genes=None, gene_key: str | None = None,
                 layer: str | None = None, shard_cells: int = SHARD_CELLS, overwrite: bool = False,
                 allow_non_integer: bool = False, progress: bool = True) -> CorpusCells:
    """Convert `.h5ad` files of raw counts into a corpus folder, reading each file in row chunks
    (memory does not grow with the number of cells). genes, gene_key, layer, allow_non_integer:
    as in `exceiver.pretrain`; every file is checked before anything is written."""
    paths = [Path(f) for f in files]
    if not paths:
        raise ExceiverInputError("no datasets given")
    if shard_cells < 1:
        raise ExceiverInputError(f"{option('shard_cells')} must be >= 1")
    stems = [p.stem for p in paths]
    names = [f"{s}#{i}" if stems.count(s) > 1 else s for i, s in enumerate(stems)]
    tables = [(name, h5ad_var(path, layer)) for name, path in zip(names, paths)]
    keys = gene_keys(tables, gene_key)
    vocab = build_vocab(tables, genes, keys)
    sources = [H5adCells(p, vocab, gene_key=k, layer=layer, name=n, allow_non_integer=allow_non_integer)
               for p, k, n in zip(paths, keys, names)]
    with atomic_dir(out, overwrite=overwrite) as folder:
        (folder / "shards").mkdir()
        vocab.save(folder / "genes.txt")
        np.save(folder / "measured.npy", np.concatenate([s.measured for s in sources]))
        shards, datasets = [], []
        with progress_bar(total=sum(s.n_cells for s in sources), unit="cell", desc="building corpus",
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
        read = source.read(start, min(start + READ_CELLS, source.n_cells))
        cells = prepare_cells(read, source.name)
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
        bar.update(read.n_cells)
    if shard is not None:
        shards.append(shard.close())
    report_dropped(source.name, source.n_cells, kept)
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


def fit_scaler(corpus: CorpusCells, validation: np.ndarray, *, standardise: bool = True,
               progress: bool = True) -> GeneScaler:
    """The scaler, fitted on the corpus's training cells (`validation` False) in two streaming passes."""
    def training_chunks():
        blocks = corpus.blocks()
        with progress_bar(total=len(blocks), desc="fitting the scaler", unit="block", disable=not progress,
                          leave=False) as bar:
            for a, b in blocks:
                cells = corpus.read(int(a), int(b))
                yield cells.subset(np.flatnonzero(~validation[a:b]))
                bar.update(1)

    return GeneScaler.fit_chunks(training_chunks, len(corpus.vocab), standardise=standardise)
