"""Translate a dataset's genes into a model's gene names (e.g. mouse data into a human vocabulary).

A gene map is a two-column table, one pair per line: the model's gene, then the dataset's gene
(the layout of Ensembl ortholog tables such as `human,mouse`). Counts of dataset genes that map to
the same model gene are summed; a dataset gene mapped to several model genes goes to the first of
them, so that no count is duplicated. Matching is exact, then case-insensitive for the rest (some
mouse files upper-case their symbols).
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from exceiver.data.counts import counts_matrix, counts_var
from exceiver.data.vocab import dataset_genes
from exceiver.errors import ExceiverInputError, plain

log = logging.getLogger(__name__)


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


def map_genes(adata: ad.AnnData, gene_map: str | Path | pd.DataFrame, *, gene_key: str | None = None,
              layer: str | None = None, name: str = "dataset") -> ad.AnnData:
    """A new AnnData whose genes (var_names) are the model genes that `adata`'s genes map to,
    with counts summed accordingly; obs is kept, unmapped genes are dropped."""
    pairs = gene_map if isinstance(gene_map, pd.DataFrame) else read_gene_map(gene_map)
    pairs = pairs.iloc[:, :2].set_axis(["model_gene", "data_gene"], axis=1).astype(str)
    genes = pd.Index(dataset_genes(counts_var(adata, layer, name), gene_key).astype(str))
    first = pairs.drop_duplicates("data_gene")  # one model gene per dataset gene
    exact = dict(zip(first.data_gene, first.model_gene))
    folded = dict(zip(first.data_gene.str.upper(), first.model_gene))
    target = [exact.get(g, folded.get(g.upper())) for g in genes]
    keep = np.flatnonzero([t is not None for t in target])
    if not len(keep):
        raise ExceiverInputError(f"{name}: none of its {len(genes):,} genes is in the gene map "
                                 f"(e.g. {plain(genes[:3])}); check the map's column order: model gene, dataset gene")
    model_genes, column = np.unique(np.asarray(target, dtype=object)[keep].astype(str), return_inverse=True)
    projection = sp.csr_matrix((np.ones(len(keep), dtype=np.float32), (keep, column)),
                               shape=(len(genes), len(model_genes)))
    counts = counts_matrix(adata, layer, name) @ projection
    return ad.AnnData(sp.csr_matrix(counts, dtype=np.float32), obs=adata.obs.copy(),
                      var=pd.DataFrame(index=pd.Index(model_genes, name="gene")))


def translate_datasets(datasets: list[tuple[str, ad.AnnData]], gene_map: str | Path | pd.DataFrame,
                       gene_key: str | None = None, layer: str | None = None) -> list[tuple[str, ad.AnnData, bool]]:
    """Translate the datasets whose genes are the map's dataset genes (e.g. the mouse files of a
    human+mouse collection) into model genes; the others, whose genes are already model genes,
    are left as they are. Returns (name, AnnData, translated?) per dataset: a translated one
    holds its counts in X and its genes in var_names."""
    pairs = gene_map if isinstance(gene_map, pd.DataFrame) else read_gene_map(gene_map)
    # Exact names: upper-cased, many mouse symbols would read as their human orthologs.
    model_side, data_side = set(pairs.iloc[:, 0].astype(str)), set(pairs.iloc[:, 1].astype(str))
    result = []
    for name, adata in datasets:
        key = gene_key if gene_key in adata.var.columns else None
        genes = pd.Index(dataset_genes(adata, key).astype(str))
        as_data, as_model = int(genes.isin(data_side).sum()), int(genes.isin(model_side).sum())
        if as_data > as_model:
            log.info("%s: translating its genes through the gene map (%s of %s are dataset genes of the map)",
                     name, f"{as_data:,}", f"{len(genes):,}")
            result.append((name, map_genes(adata, pairs, gene_key=key, layer=layer, name=name), True))
        else:
            result.append((name, adata, False))
    return result


def is_dataset_side(pairs: pd.DataFrame, genes) -> bool:
    """Whether more of `genes` are the map's dataset genes (e.g. mouse symbols) than its model
    genes: such data is translated through a model's own gene map."""
    genes = pd.Index(pd.Series(genes).astype(str))
    return int(genes.isin(pairs.iloc[:, 1]).sum()) > int(genes.isin(pairs.iloc[:, 0]).sum())
