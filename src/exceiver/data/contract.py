"""How a model reads a dataset, decided in one place: the data contract.

scvi-tools registers where a dataset's fields live once (`setup_anndata`); an exceiver model
remembers its contract in its folder (config.json's `data` section and `gene_map.csv`) and every
tool reads a dataset through `read_dataset`, which does, once and in this order:

1. the keys: a call's `gene_key` / `layer`, else the model's where the data has that var column /
   layer ("var_names" and "X" ask for the defaults whatever the model remembers);
2. the genes: translated into model genes through a call's gene map (its pairs before the model's
   own), or the model's own map where the data's genes are its dataset side (mouse data, human
   model); counts of genes mapping to one model gene are summed;
3. alignment to the vocabulary and the count checks (every cell: raw counts unless non-integer
   counts are allowed);
4. restriction to the genes the model was trained on, refusing cells left without counts (outputs
   stay aligned with the user's cells); a backed AnnData is streamed from its file instead.

The result, `ModelCells`, also translates gene names both ways, so that a mouse user who asks
about `Gfap` is answered about `Gfap`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import anndata as ad
import numpy as np
import pandas as pd

from exceiver.data.cells import CellCounts, align
from exceiver.data.counts import count_layers, counts_var
from exceiver.data.genemap import GeneMapInput, GenePairs
from exceiver.data.preprocess import PrepareCells, prepare_cells
from exceiver.data.sources import H5adCells, h5ad_layers, h5ad_var
from exceiver.data.vocab import VAR_NAMES, GeneVocab, dataset_genes
from exceiver.errors import ExceiverInputError, plain

log = logging.getLogger(__name__)

DEFAULT_LAYER = "X"


class ReadingOptions(TypedDict, total=False):
    """A call's choices of how to read a dataset; each left out keeps the model's contract.

    gene_key: var column of gene identifiers ("var_names" for the index).
    layer: where the raw counts are: a layer name, "raw" for adata.raw, "X".
    gene_map: pairs (model gene, dataset gene), a CSV/TSV file of them or a table: the dataset's
        genes are translated into model genes through them (before the model's own pairs).
    allow_non_integer: accept counts that are mostly not integers (log-normalised data is refused).
    name: the dataset's name in messages.
    """

    gene_key: str | None
    layer: str | None
    gene_map: GeneMapInput | None
    allow_non_integer: bool
    name: str


@dataclass(frozen=True, eq=False)
class DataContract:
    """What a model remembers of how it reads data; `read_dataset` applies it."""

    gene_key: str | None = None  # used for data that has this var column
    layer: str | None = None  # used for data that has this layer
    gene_map: GenePairs | None = None  # pairs the model carries (model gene, dataset gene)
    allow_non_integer: bool = False

    def to_dict(self) -> dict:
        """The `data` section of a model's config.json (the pairs are saved beside it)."""
        return {"gene_key": self.gene_key, "layer": self.layer, "allow_non_integer": self.allow_non_integer}

    def layer_of(self, layers, layer: str | None = None) -> str | None:
        """Where a dataset's counts are: the call's layer, else the contract's where the data has it."""
        if layer is None and self.layer in layers:
            layer = self.layer
        return None if layer == DEFAULT_LAYER else layer

    def gene_key_of(self, var_columns, gene_key: str | None = None) -> str | None:
        """Which var column (of the counts' var) holds gene identifiers: the call's, else the
        contract's where the data has it."""
        if gene_key is None and self.gene_key in var_columns:
            gene_key = self.gene_key
        return None if gene_key == VAR_NAMES else gene_key

    def translation(self, data_genes: np.ndarray, gene_map: GeneMapInput | GenePairs | None) -> GenePairs | None:
        """The pairs to translate a dataset by, where its genes are their dataset side (mouse genes
        for a human model): a call's map before the model's own, or the model's own; None: the
        dataset is read as it is (its genes are already model genes). One rule for a single
        dataset and for each dataset of a pretraining collection."""
        given = GenePairs.of(gene_map)
        pairs = self.gene_map if given is None else given.before(self.gene_map)
        return pairs if pairs is not None and pairs.is_dataset_side(data_genes) else None


@dataclass
class ModelCells:
    """A dataset read by a model: its cells on the model's trained genes, and its gene names.

    cells: counts in vocabulary space (`CellCounts`), or a file streamed in chunks (`H5adCells`,
        each chunk made ready by `prepare`); rows are the dataset's cells, in order.
    data_genes: the dataset's gene identifiers (of the counts' var), `gene_ids` their vocabulary
        ids after translation (-1: the model has no such gene).
    """

    cells: CellCounts | H5adCells
    adata: ad.AnnData
    name: str
    data_genes: np.ndarray
    gene_ids: np.ndarray
    vocab: GeneVocab
    trained: np.ndarray  # bool per vocabulary gene
    gene_key: str | None = None  # the var column and layer it was read by (None: var_names, X)
    layer: str | None = None
    pairs: GenePairs | None = None
    n_left_out: int = 0  # cells without counts in the trained genes, left out (`read_dataset(empty="drop")`)

    @property
    def n_cells(self) -> int:
        return self.cells.n_cells

    @property
    def translated(self) -> bool:
        return self.pairs is not None

    @property
    def prepare(self) -> PrepareCells:
        """What a chunk read from a file goes through (in memory, cells are ready already)."""
        return PrepareCells(self.trained, self.name)

    @property
    def measured(self) -> np.ndarray:
        """Vocabulary genes this dataset measured (bool per vocabulary gene, trained genes only)."""
        return self.cells.measured.any(0) & self.trained

    def subset(self, rows: np.ndarray) -> ModelCells:
        """The same dataset's cells `rows` (in memory only)."""
        return dataclasses.replace(self, cells=self.in_memory().subset(rows), adata=self.adata[rows])

    def keep_genes(self, keep: np.ndarray) -> ModelCells:
        """Only vocabulary genes where `keep` is True measured (the trained genes two datasets
        share); cells left without counts are refused."""
        return dataclasses.replace(self, cells=prepare_cells(self.in_memory(), self.name, genes=keep, empty="refuse",
                                                             genes_words="the genes shared with the other dataset"))

    def in_memory(self) -> CellCounts:
        if not isinstance(self.cells, CellCounts):
            raise ExceiverInputError(f"{self.name}: read it into memory first (anndata.read_h5ad without backed=)")
        return self.cells

    def model_gene_ids(self, genes) -> np.ndarray:
        """Vocabulary ids of genes named as the dataset names them (or by their model names);
        -1 where neither knows the gene."""
        names = [str(g) for g in genes]
        by_data = dict(zip(self.data_genes[::-1], self.gene_ids[::-1]))  # the first of duplicates wins
        ids = np.array([by_data.get(g, -1) for g in names], dtype=np.int64)
        if self.pairs is not None and (ids < 0).any():  # mapped genes this dataset does not measure
            ids[ids < 0] = self.vocab.ids(self.pairs.translate([g for g, i in zip(names, ids) if i < 0]))
        missing = ids < 0
        if missing.any():  # model names, e.g. a human symbol asked of mouse data
            ids[missing] = self.vocab.ids([g for g, m in zip(names, missing) if m])
        return ids

    def resolve_genes(self, genes, what: str = "genes") -> np.ndarray:
        """Vocabulary ids of genes named as the dataset names them (or by the model's names);
        unknown genes, and genes no training cell expressed (their embeddings are untrained, so
        predictions about them mean nothing), are refused."""
        genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        if not genes:
            raise ExceiverInputError(f"no {what} given")
        duplicated = sorted({g for g in genes if genes.count(g) > 1})
        if duplicated:
            raise ExceiverInputError(f"{what} are listed more than once: {duplicated[:5]}")
        ids = self.model_gene_ids(genes)
        unknown = [g for g, i in zip(genes, ids) if i < 0]
        if unknown:
            through = " (directly or through its gene map)" if self.translated else ""
            raise ExceiverInputError(
                f"{len(unknown)} of {len(genes)} {what} are not in the model's vocabulary of {len(self.vocab):,} "
                f"genes{through}: {unknown[:5]} (vocabulary genes look like {plain(self.vocab.genes[:3])})")
        untrained = [g for g, i in zip(genes, ids) if not self.trained[i]]
        if untrained:
            raise ExceiverInputError(
                f"{len(untrained)} {what} were never expressed in the model's training cells, so the model "
                f"knows nothing about them: {untrained[:5]}")
        return ids

    def data_gene_names(self, gene_ids: np.ndarray) -> np.ndarray:
        """The dataset's name for each vocabulary id: its first gene that reads as it, else the
        model's name (a gene the dataset does not measure)."""
        first = pd.Series(self.data_genes).groupby(self.gene_ids).first()
        names = np.asarray(self.vocab.genes, dtype=object)[gene_ids].copy()
        known = np.isin(gene_ids, first.index)
        names[known] = first.reindex(np.asarray(gene_ids)[known]).to_numpy()
        return names.astype(str)


def read_dataset(adata: ad.AnnData, vocab: GeneVocab, trained: np.ndarray, contract: DataContract,
                 options: ReadingOptions | None = None, *, empty: str = "refuse") -> ModelCells:
    """`adata` read by a model of vocabulary `vocab` whose trained genes are `trained` under
    `contract` and a call's `options` (see the module's docstring for the steps). Cells without
    counts in the trained genes are refused (`empty="refuse"`: outputs are aligned with the
    user's cells), left out for reports on a sample (`"drop"`; `adata` and `n_left_out` then say
    which), or kept for a caller that restricts the genes further and refuses then (`"keep"`,
    e.g. `ModelCells.keep_genes`); "drop" and "keep" read into memory."""
    if empty not in ("refuse", "drop", "keep"):
        raise ValueError(f"empty must be 'refuse', 'drop' or 'keep', got {empty!r}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(ReadingOptions.__annotations__))
    if unknown:
        raise ExceiverInputError(f"unknown reading options {plain(unknown)}; they are {plain(list(ReadingOptions.__annotations__))}")
    name = options.get("name") or (Path(adata.filename).stem if adata.isbacked else "dataset")
    if adata.isbacked and adata.is_view:  # a slice of a file: its rows, not the whole file
        adata = adata.to_memory()
    allow = bool(options.get("allow_non_integer") or contract.allow_non_integer)
    layers = h5ad_layers(adata.filename) if adata.isbacked else count_layers(adata)
    layer = contract.layer_of(layers, options.get("layer"))
    var = h5ad_var(adata.filename, layer) if adata.isbacked else counts_var(adata, layer, name)
    gene_key = contract.gene_key_of(var.var.columns, options.get("gene_key"))  # the counts' var (raw.var for raw)
    data_genes = dataset_genes(var, gene_key).astype(str)
    pairs = contract.translation(data_genes, options.get("gene_map"))
    if pairs is not None:
        log.info("%s: read through a gene map into the model's genes (%s pairs)", name, f"{len(pairs):,}")
    n_left_out = 0
    if adata.isbacked and empty == "refuse":
        cells = H5adCells(adata.filename, vocab, gene_key=gene_key, layer=layer, name=name,
                          allow_non_integer=allow, pairs=pairs)
        gene_ids = cells.ids
    else:
        aligned = align(adata, vocab, gene_key=gene_key, layer=layer, name=name, allow_non_integer=allow, pairs=pairs)
        if empty == "drop":
            kept = np.flatnonzero(aligned.keep_genes(trained).n_genes_expressed > 0)
            if not len(kept):
                raise ExceiverInputError(f"{name}: no cell has counts in the genes the model was trained on")
            n_left_out = adata.n_obs - len(kept)
            adata, aligned = (adata, aligned) if not n_left_out else (adata[kept], aligned.subset(kept))
        cells = aligned.keep_genes(trained) if empty == "keep" else prepare_cells(aligned, name, genes=trained,
                                                                                   empty="refuse")
        gene_ids = vocab.ids(data_genes if pairs is None else pairs.translate(data_genes))
    return ModelCells(cells, adata, name, data_genes, gene_ids, vocab, trained, gene_key, layer, pairs, n_left_out)
