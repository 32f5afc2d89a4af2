"""Translate a dataset's genes into a model's gene names (e.g. mouse data into a human vocabulary).

A gene map is a two-column table, one pair per line: the model's gene, then the dataset's gene
(the layout of Ensembl ortholog tables such as `human,mouse`). Counts of dataset genes that map to
the same model gene are summed; a dataset gene mapped to several model genes goes to the first of
them, so that no count is duplicated. Matching is exact, then case-insensitive for the rest (some
mouse files upper-case their symbols). `GenePairs` is the one place that reads pairs this way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from exceiver.data.counts import counts_matrix, counts_var
from exceiver.data.vocab import dataset_genes
from exceiver.errors import ExceiverInputError, plain

log = logging.getLogger(__name__)

GeneMapInput = str | Path | pd.DataFrame


def read_gene_map(path: str | Path) -> pd.DataFrame:
    """The (model_gene, data_gene) pairs of a CSV or TSV file; an optional header line is skipped
    when its names are not genes of the table, pairs with an empty side are dropped."""
    path = Path(path)
    if not path.is_file():
        raise ExceiverInputError(f"gene map {path} does not exist")
    sep = "\t" if path.suffix.lower() in (".tsv", ".txt") or ".tsv" in path.name else ","
    try:
        table = pd.read_csv(path, sep=sep, header=None, dtype=str, usecols=[0, 1], keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as err:
        raise ExceiverInputError(f"gene map {path} is not a two-column table ({err})") from err
    table.columns = ["model_gene", "data_gene"]
    table = table[(table.model_gene.str.strip() != "") & (table.data_gene.str.strip() != "")]
    if table.empty:
        raise ExceiverInputError(f"gene map {path} holds no gene pairs")
    return table.reset_index(drop=True)


class GenePairs:
    """The (model gene, dataset gene) pairs of a gene map, and every question asked of them."""

    def __init__(self, table: pd.DataFrame):
        self.table = table.iloc[:, :2].set_axis(["model_gene", "data_gene"], axis=1).astype(str).reset_index(drop=True)
        first = self.table.drop_duplicates("data_gene")  # one model gene per dataset gene
        self._exact = dict(zip(first.data_gene, first.model_gene))
        self._folded = dict(zip(first.data_gene.str.upper(), first.model_gene))

    @classmethod
    def of(cls, gene_map: GeneMapInput | GenePairs | None) -> GenePairs | None:
        """Pairs from a file, a table or pairs (None stays None)."""
        if gene_map is None or isinstance(gene_map, GenePairs):
            return gene_map
        return cls(gene_map if isinstance(gene_map, pd.DataFrame) else read_gene_map(gene_map))

    def __len__(self) -> int:
        return len(self.table)

    def model_genes(self, data_genes: Iterable[str]) -> np.ndarray:
        """The model gene of each dataset gene (object array; None where the map has none)."""
        return np.asarray([self._exact.get(g, self._folded.get(str(g).upper())) for g in data_genes], dtype=object)

    def translate(self, data_genes: Iterable[str]) -> np.ndarray:
        """`model_genes` as strings, "" where the map has none (an identifier no vocabulary holds)."""
        mapped = self.model_genes(data_genes)
        return np.where([m is None for m in mapped], "", mapped).astype(str)

    def is_dataset_side(self, genes: Iterable[str]) -> bool:
        """Whether more of `genes` are the map's dataset genes (e.g. mouse symbols) than its model
        genes (exact names: upper-cased, many mouse symbols would read as their human orthologs)."""
        genes = pd.Index(pd.Series(list(genes), dtype=object).astype(str))
        return int(genes.isin(self.table.data_gene).sum()) > int(genes.isin(self.table.model_gene).sum())

    def within(self, model_genes: Sequence[str]) -> GenePairs:
        """The pairs whose model gene is one of `model_genes` (what a model carries for its vocabulary)."""
        return GenePairs(self.table[self.table.model_gene.isin(set(map(str, model_genes)))])

    def before(self, other: GenePairs | None) -> GenePairs:
        """These pairs first, then `other`'s: a user's map takes precedence over a model's own."""
        return self if other is None else GenePairs(pd.concat([self.table, other.table], ignore_index=True))


def map_genes(adata: ad.AnnData, gene_map: GeneMapInput | GenePairs, *, gene_key: str | None = None,
              layer: str | None = None, name: str = "dataset") -> ad.AnnData:
    """A new AnnData whose genes (var_names) are the model genes that `adata`'s genes map to,
    with counts summed accordingly; obs is kept, unmapped genes are dropped."""
    genes = pd.Index(dataset_genes(counts_var(adata, layer, name), gene_key).astype(str))
    target = GenePairs.of(gene_map).model_genes(genes)
    keep = np.flatnonzero([t is not None for t in target])
    if not len(keep):
        raise ExceiverInputError(f"{name}: none of its {len(genes):,} genes is in the gene map "
                                 f"(e.g. {plain(genes[:3])}); check the map's column order: model gene, dataset gene")
    model_genes, column = np.unique(target[keep].astype(str), return_inverse=True)
    projection = sp.csr_matrix((np.ones(len(keep), dtype=np.float32), (keep, column)),
                               shape=(len(genes), len(model_genes)))
    counts = counts_matrix(adata, layer, name) @ projection
    return ad.AnnData(sp.csr_matrix(counts, dtype=np.float32), obs=adata.obs.copy(),
                      var=pd.DataFrame(index=pd.Index(model_genes, name="gene")))
