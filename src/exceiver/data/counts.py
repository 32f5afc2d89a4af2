"""Where a dataset keeps its raw counts, and the checks counts pass where they are read.

Counts live in `X`, in a layer, or in `adata.raw` (`layer="raw"`: `raw.X`, whose genes are
`raw.var`). Every reading point (an AnnData aligned in memory, an `.h5ad` file read from disk)
calls `refuse_empty` and `check_counts`, so that every command refuses the same input with the
same one-line message before its work starts.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import scipy.sparse as sp

from exceiver.errors import ExceiverInputError, option, plain

log = logging.getLogger(__name__)

# Raw counts are integers. A few fractional values can be rounding noise of a pipeline (ambient-RNA
# correction, say); above this share of the nonzero values, the matrix is normalised, not counts.
NON_INTEGER_LIMIT = 0.1
RAW = "raw"


def counts_location(layer: str | None, layers, has_raw: bool, name: str = "dataset") -> tuple[str, str | None]:
    """Where `layer` finds the counts: ("X", None), ("layers", layer) or ("raw", None) for
    adata.raw. A layer literally named "raw" wins over adata.raw; unknown layers are refused."""
    layers = list(layers)
    if layer is None:
        return "X", None
    if layer in layers:
        return "layers", layer
    if layer == RAW and has_raw:
        return "raw", None
    if layer == RAW:
        has = f"its layers: {plain(layers)}" if layers else "nor any layer"
        raise ExceiverInputError(f"{name} has no raw counts: {option('layer', RAW)} reads adata.raw, which this "
                                 f"dataset does not have ({has})")
    raw = f" and adata.raw ({option('layer', RAW)})" if has_raw else ""
    raise ExceiverInputError(f"{option('layer', layer)}: {name} has no such layer; it has layers {plain(layers)}{raw}")


def location_label(location: tuple[str, str | None]) -> str:
    """The counts' place as a message names it: X, layers['counts'] or raw.X."""
    kind, key = location
    return {"X": "X", "raw": "raw.X"}.get(kind) or f"layers[{key!r}]"


def count_layers(adata: ad.AnnData) -> list[str]:
    """The layers `layer=` may name in `adata`: its layers, and "raw" when it has adata.raw."""
    return list(adata.layers) + ([RAW] if adata.raw is not None else [])


def counts_var(adata: ad.AnnData, layer: str | None = None, name: str = "dataset") -> ad.AnnData:
    """An AnnData whose `var` describes the columns of `counts_matrix(adata, layer)`: `adata`
    itself, or, for adata.raw, a var-only AnnData of `raw.var`."""
    if counts_location(layer, adata.layers.keys(), adata.raw is not None, name)[0] == "raw":
        return ad.AnnData(var=adata.raw.var)
    return adata


def counts_matrix(adata: ad.AnnData, layer: str | None = None, name: str = "dataset") -> sp.csr_matrix:
    """The raw-count matrix of `adata` (X, a layer or raw.X) as CSR, without densifying sparse input."""
    kind, key = counts_location(layer, adata.layers.keys(), adata.raw is not None, name)
    matrix = adata.X if kind == "X" else adata.raw.X if kind == "raw" else adata.layers[key]
    if matrix is None:
        raise ExceiverInputError(f"{name} has no expression matrix (X is None)")
    if hasattr(matrix, "to_memory"):  # backed sparse dataset
        matrix = matrix.to_memory()
    if sp.issparse(matrix):
        return sp.csr_matrix(matrix)
    return sp.csr_matrix(np.asarray(matrix))


def refuse_empty(name: str, n_cells: int, n_genes: int) -> None:
    """Refuse a dataset without cells or genes (every command, the same message)."""
    if n_cells == 0 or n_genes == 0:
        raise ExceiverInputError(f"{name} is empty ({n_cells:,} cells x {n_genes:,} genes): there is nothing to read")


def check_counts(matrix: sp.spmatrix, name: str = "dataset", *, where: str = "X", allow_non_integer: bool = False,
                 note: bool = True, elsewhere: list[str] | None = None) -> float:
    """Refuse counts that are not finite, negative, or mostly not integers (more than
    `NON_INTEGER_LIMIT` of the nonzero values; `allow_non_integer` accepts them); returns the
    share of non-integer nonzero values and, with `note`, logs it when some are accepted
    (chunks of a file read during a progress bar pass `note=False`: their file was noted up front).
    elsewhere: the dataset's other layers (and "raw"), which messages suggest."""
    data = matrix.data
    bad = ~np.isfinite(data)
    if bad.any():
        raise ExceiverInputError(
            f"{name}: {int(bad.sum()):,} count entries in {where} are NaN or infinite; exceiver needs raw counts"
        )
    negative = data < 0
    if negative.any():
        raise ExceiverInputError(
            f"{name}: {int(negative.sum()):,} count entries in {where} are negative (min {float(data.min()):.3g}); "
            f"exceiver needs raw counts, not scaled or centred data{_instead(elsewhere, '')}"
        )
    nonzero = data[data != 0]
    fraction = float(np.mean(nonzero != np.round(nonzero))) if len(nonzero) else 0.0
    if fraction > NON_INTEGER_LIMIT and not allow_non_integer:
        raise ExceiverInputError(
            f"{name}: {_percent(fraction)} of the nonzero values in {where} are not integers: exceiver needs raw "
            f"counts{_instead(elsewhere, option('allow_non_integer', True))} if you know what you do"
        )
    if fraction and note:
        log.warning("%s: %s of the nonzero values in %s are not integers; they are used as counts", name,
                    _percent(fraction), where)
    return fraction


def _instead(elsewhere: list[str] | None, escape: str) -> str:
    """The end of a message on counts that are not counts: where else they may be (`elsewhere`;
    None: not known), and the option that accepts them anyway (`escape`, if any)."""
    if elsewhere == []:
        return ", and the dataset has no layer or raw to read them from" + (f"; pass {escape}" if escape else "")
    layers = " or ".join(option("layer", layer) for layer in (elsewhere or ["counts"])[:3])
    where = "the file holds them" if elsewhere is None else "it holds them" if len(elsewhere) == 1 else "one holds them"
    return f"; pass {layers} if {where}" + (f", or {escape}" if escape else "")


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"
