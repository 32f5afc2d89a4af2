"""Where cells come from: AnnData objects and `.h5ad` files, read whole or in row ranges.

A cell source is anything with `n_cells` and `read(start, stop) -> CellCounts` (cells already in
vocabulary space): `H5adCells` here (a file read without loading its matrix), and
`exceiver.data.corpus.CorpusCells` for converted corpora. Genes are aligned once per source;
reading a range only re-indexes its non-zero entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

from exceiver.data.cells import CellCounts, gene_alignment, to_vocabulary
from exceiver.data.counts import RAW, check_counts, counts_location, location_label, refuse_empty
from exceiver.data.genemap import GenePairs
from exceiver.data.vocab import GeneVocab
from exceiver.errors import ExceiverInputError

DataInput = str | Path | ad.AnnData

READ_CELLS = 4096  # cells read from disk at a time (inference chunks, training blocks)


class H5adCells:
    """The cells of one `.h5ad` file, read from disk in row ranges (X, a layer or raw.X, sparse or
    dense) and aligned to `vocab` once, from `var`. The file is refused up front if it is empty or
    its first block of cells is not raw counts; every block read is checked again, quietly (a
    progress bar may be running). Each process opens its own file handle."""

    def __init__(self, path: str | Path, vocab: GeneVocab, *, gene_key: str | None = None,
                 layer: str | None = None, name: str | None = None, allow_non_integer: bool = False,
                 pairs: GenePairs | None = None):
        self.path, self.layer, self.name = Path(path), layer, name or Path(path).stem
        self.allow_non_integer = allow_non_integer
        self.n_genes = len(vocab)
        with _open_h5ad(self.path) as file:
            var, matrix, self.location = _counts(file, layer, self.name)
            self.where = location_label(self.location)
            self.ids, self.measured = gene_alignment(var, vocab, gene_key=gene_key, name=self.name, pairs=pairs)
            self.n_cells = matrix.shape[0]
            elsewhere = [other for other in _layer_names(file) if other != layer]
            check_counts(_rows(matrix, 0, min(self.n_cells, READ_CELLS)), self.name, where=self.where,
                         allow_non_integer=allow_non_integer, elsewhere=elsewhere)
        self._file: h5py.File | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}  # h5py handles do not cross processes

    def read(self, start: int, stop: int) -> CellCounts:
        if self._file is None:
            self._file = _open_h5ad(self.path)
        rows = _rows(_matrix(self._file, self.location, self.name), start, stop)
        check_counts(rows, self.name, where=self.where, allow_non_integer=self.allow_non_integer, note=False)
        index = self._file["obs"][self._file["obs"].attrs["_index"]]
        names = np.asarray(index.asstr()[start:stop] if index.dtype.kind in "OS" else index[start:stop]).astype(str)
        return CellCounts(to_vocabulary(rows, self.ids, self.n_genes), self.measured,
                          np.zeros(stop - start, dtype=np.int32), names, [self.name])


def h5ad_var(path: str | Path, layer: str | None = None) -> ad.AnnData:
    """An AnnData holding only the `var` table of an `.h5ad` file's counts (raw.var for
    `layer="raw"`), for vocabularies and alignment; refuses a file without cells or genes."""
    path = Path(path)
    with _open_h5ad(path) as file:
        return _counts(file, layer, path.stem)[0]


def h5ad_layers(path: str | Path) -> list[str]:
    """The names `layer=` may give for an `.h5ad` file (its layers, and "raw" if it has one),
    read without loading them."""
    with _open_h5ad(Path(path)) as file:
        return _layer_names(file)


def _layer_names(file: h5py.File) -> list[str]:
    return (list(file["layers"]) if "layers" in file else []) + ([RAW] if "raw" in file else [])


def _open_h5ad(path: Path) -> h5py.File:
    if not path.is_file():
        raise ExceiverInputError(f"dataset {path} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ExceiverInputError(f"cannot read {path} as an .h5ad file ({err})") from err


def _counts(file: h5py.File, layer: str | None, name: str):
    """(var-only AnnData, matrix, where the counts are) of X, a layer or raw.X; refuses a missing
    matrix and an empty one."""
    layers = list(file["layers"]) if "layers" in file else []
    location = counts_location(layer, layers, "raw" in file, name)
    matrix = _matrix(file, location, name)
    var = ad.AnnData(var=ad.io.read_elem((file["raw"] if location[0] == "raw" else file)["var"]))
    refuse_empty(name, matrix.shape[0], var.n_vars)
    return var, matrix, location


def _matrix(file: h5py.File, location: tuple[str, str | None], name: str):
    """The counts at `location` (from `counts_location`) as something that slices rows from disk."""
    kind, key = location
    element = file["layers"][key] if kind == "layers" else (file["raw"] if kind == "raw" else file).get("X")
    if element is None:
        raise ExceiverInputError(f"{name} has no expression matrix (X is None)")
    return ad.io.sparse_dataset(element) if isinstance(element, h5py.Group) else element


def _rows(matrix, start: int, stop: int) -> sp.csr_matrix:
    rows = matrix[start:stop]
    return sp.csr_matrix(rows) if sp.issparse(rows) else sp.csr_matrix(np.asarray(rows))


def read_datasets(data: DataInput | Sequence[DataInput]) -> list[tuple[str, ad.AnnData]]:
    """Open AnnData objects or .h5ad paths, each with a name for messages; refuses empty ones."""
    items = [data] if isinstance(data, (str, Path, ad.AnnData)) else list(data)
    if not items:
        raise ExceiverInputError("no datasets given")
    datasets = []
    for i, item in enumerate(items):
        if isinstance(item, ad.AnnData):
            datasets.append((f"adata{i}", item))
            continue
        path = Path(item)
        if not path.is_file():
            raise ExceiverInputError(f"dataset {path} does not exist")
        try:
            datasets.append((path.stem, ad.read_h5ad(path)))
        except Exception as err:  # h5py/anndata raise many types for a non-h5ad file
            raise ExceiverInputError(f"cannot read {path} as an .h5ad file ({err})") from err
    for name, adata in datasets:
        refuse_empty(name, adata.n_obs, adata.n_vars)
    names = [name for name, _ in datasets]
    return [(f"{name}#{i}" if names.count(name) > 1 else name, adata)
            for i, (name, adata) in enumerate(datasets)]
