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
from exceiver.data.vocab import GeneVocab
from exceiver.errors import ExceiverInputError

DataInput = str | Path | ad.AnnData

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


def h5ad_layers(path: str | Path) -> list[str]:
    """The names of an `.h5ad` file's layers, read without loading them."""
    with _open_h5ad(Path(path)) as file:
        return list(file["layers"]) if "layers" in file else []


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


def read_datasets(data: DataInput | Sequence[DataInput]) -> list[tuple[str, ad.AnnData]]:
    """Open AnnData objects or .h5ad paths, each with a name for messages."""
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
    names = [name for name, _ in datasets]
    return [(f"{name}#{i}" if names.count(name) > 1 else name, adata)
            for i, (name, adata) in enumerate(datasets)]
