"""Results written into a copy of an `.h5ad` file batch by batch, so that an output for millions of
cells never has to be in memory: the copy is staged beside the output (`exceiver.io.atomic_file`)
and appears only when complete."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import h5py
import numpy as np

from exceiver.io import atomic_file


class ObsmWriter:
    """Callable writing rows of an `obsm` array (rows need not arrive in order), and `uns`."""

    def __init__(self, file: h5py.File, key: str, shape: tuple[int, int]):
        self.file, self.key = file, key
        obsm = file.require_group("obsm")
        if key in obsm:
            del obsm[key]
        self.array = obsm.create_dataset(key, shape=shape, dtype=np.float32,
                                         chunks=(max(1, min(shape[0], 4096)), max(1, shape[1])))
        self.array.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        self.written = np.zeros(shape[0], dtype=bool)

    def __call__(self, rows: np.ndarray, values: np.ndarray) -> None:
        order = np.argsort(rows)  # h5py writes selections of increasing rows
        self.array[rows[order]] = values[order]
        self.written[rows] = True

    def uns(self, entry: dict) -> None:
        """Set `uns["exceiver"][key]` (other entries of `uns["exceiver"]` are kept)."""
        uns = self.file.require_group("uns")
        exceiver = ad.io.read_elem(uns["exceiver"]) if "exceiver" in uns else {}
        exceiver[self.key] = entry
        if "exceiver" in uns:
            del uns["exceiver"]
        ad.io.write_elem(uns, "exceiver", exceiver)


@contextlib.contextmanager
def h5ad_copy_with_obsm(source: str | Path, out: str | Path, key: str, shape: tuple[int, int], *,
                        overwrite: bool = False) -> Iterator[ObsmWriter]:
    """Yield a writer of `obsm[key]` into a staged copy of `source` that becomes `out` only if the
    block succeeds and every row was written."""
    with atomic_file(out, overwrite=overwrite) as tmp:
        shutil.copyfile(source, tmp)
        with h5py.File(tmp, "r+") as file:
            writer = ObsmWriter(file, key, shape)
            yield writer
            missing = int((~writer.written).sum())
            if missing:
                raise RuntimeError(f"{missing:,} of {shape[0]:,} cells were not written")
