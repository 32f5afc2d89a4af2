"""Gene vocabularies: the ordered list of gene identifiers that is the model's input space, and
how a training vocabulary is built from datasets (the union of their genes, optionally restricted
to a list such as protein-coding genes)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from exceiver.errors import ExceiverInputError, option, plain

log = logging.getLogger(__name__)

VAR_NAMES = "var_names"  # gene_key="var_names": the identifiers are var_names (where no column has that name)

class GeneVocab:
    """An ordered list of unique gene identifiers; position i is the model's gene id i."""

    def __init__(self, genes: Iterable[str]):
        genes = [str(g) for g in genes]
        if not genes:
            raise ExceiverInputError("a gene vocabulary needs at least one gene")
        index = pd.Index(genes)
        if index.has_duplicates:
            dups = index[index.duplicated()].unique()
            raise ExceiverInputError(
                f"gene vocabulary has {len(dups)} duplicated identifiers, e.g. {plain(dups[:5])}"
            )
        bad = [g for g in genes if not g or g != g.strip() or any(c in g for c in "\t\r\n")]
        if bad:
            raise ExceiverInputError(
                f"gene vocabulary has {len(bad)} identifiers that are empty, have surrounding "
                f"whitespace or contain tabs/line breaks, e.g. {bad[:3]}"
            )
        self.genes = index

    def __len__(self) -> int:
        return len(self.genes)

    def fingerprint(self) -> str:
        """A short digest of the genes in order (two vocabularies agree iff their digests do)."""
        return f"{len(self)} genes, sha256 " + hashlib.sha256("\n".join(self.genes).encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and self.genes.equals(other.genes)

    def __repr__(self) -> str:
        return f"GeneVocab({len(self):,} genes: {', '.join(self.genes[:3])}, ...)"

    def ids(self, genes: Sequence[str]) -> np.ndarray:
        """Vocabulary ids of `genes` (-1 where a gene is not in the vocabulary)."""
        return self.genes.get_indexer(pd.Index(genes, dtype=object)).astype(np.int64)

    def subset(self, ids: np.ndarray) -> GeneVocab:
        """The vocabulary of genes `ids`, in that order."""
        return GeneVocab(self.genes[np.asarray(ids)])

    @classmethod
    def from_gene_lists(
        cls, gene_lists: Iterable[Sequence[str]], restrict_to: Sequence[str] | None = None
    ) -> GeneVocab:
        """Union of several datasets' genes, in order of first appearance, optionally restricted
        to a list (e.g. protein-coding genes)."""
        seen: dict[str, None] = {}
        for genes in gene_lists:
            seen.update(dict.fromkeys(g for g in genes if g))
        genes = list(seen)
        if restrict_to is not None:
            allowed = set(restrict_to)
            genes = [g for g in genes if g in allowed]
            if not genes:
                raise ExceiverInputError(
                    f"none of the datasets' {len(seen):,} genes is in the gene list of "
                    f"{len(allowed):,} genes; do the identifiers match (symbols vs Ensembl ids)?"
                )
        return cls(genes)

    def save(self, path: str | Path) -> None:
        """One identifier per line, verbatim (`load` reads it back exactly)."""
        Path(path).write_text("\n".join(self.genes) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> GeneVocab:
        text = Path(path).read_text(encoding="utf-8")
        return cls(text[:-1].split("\n") if text.endswith("\n") else text.split("\n"))


def read_gene_list(path: str | Path) -> list[str]:
    """One gene per line (first tab- or comma-separated field); blank lines and '#' comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise ExceiverInputError(f"gene list {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ExceiverInputError(f"gene list {path} is not a UTF-8 text file") from err
    genes = []
    for line in text.splitlines():
        field = line.split("\t")[0].split(",")[0].strip()
        if field and not field.startswith("#"):
            genes.append(field)
    if not genes:
        raise ExceiverInputError(f"gene list {path} holds no genes")
    return list(dict.fromkeys(genes))


def dataset_genes(adata: ad.AnnData, gene_key: str | None = None) -> np.ndarray:
    """The gene identifiers of a dataset: `var_names`, or a `var` column (missing values -> '')."""
    if gene_key is None or (gene_key == VAR_NAMES and VAR_NAMES not in adata.var.columns):
        return np.char.strip(np.asarray(adata.var_names, dtype=object).astype(str))
    if gene_key not in adata.var.columns:
        raise ExceiverInputError(
            f"{option('gene_key', gene_key)} names no column of var; var has columns "
            f"{plain(list(adata.var.columns))} (or use {option('gene_key', VAR_NAMES)})"
        )
    column = adata.var[gene_key]
    return np.where(column.isna(), "", column.astype(str).str.strip()).astype(str)


def gene_keys(datasets: list[tuple[str, ad.AnnData]], gene_key: str | None) -> list[str | None]:
    """`gene_key` for each dataset that has that var column, var_names for the others (files of
    one corpus often differ: Ensembl-indexed with a symbol column beside symbol-indexed)."""
    if gene_key is None or (gene_key == VAR_NAMES and not any(VAR_NAMES in a.var.columns for _, a in datasets)):
        return [None] * len(datasets)
    keys = [gene_key if gene_key in a.var.columns else None for _, a in datasets]
    if not any(keys):
        raise ExceiverInputError(f"{option('gene_key', gene_key)} names no column of var in any dataset")
    for (name, _), key in zip(datasets, keys):
        if key is None:
            log.info("%s has no var column %r: its genes are taken from var_names", name, gene_key)
    return keys


def build_vocab(datasets: list[tuple[str, ad.AnnData]], genes: str | Path | Sequence[str] | GeneVocab | None,
                keys: list[str | None]) -> GeneVocab:
    """The training vocabulary: the union of the datasets' genes, optionally restricted to a list."""
    if isinstance(genes, GeneVocab):
        return genes
    restrict = read_gene_list(genes) if isinstance(genes, (str, Path)) else genes
    return GeneVocab.from_gene_lists([dataset_genes(a, key) for (_, a), key in zip(datasets, keys)], restrict)


def model_vocabulary(base: GeneVocab, data_genes: Sequence[str], *, extend: bool, name: str = "the data") -> GeneVocab:
    """The model's genes, and (with `extend`) the data's genes outside them, appended. The genes
    left out are reported: their counts cannot reach a model that has no embedding for them."""
    outside = [g for g in dict.fromkeys(map(str, data_genes)) if g not in set(base.genes)]
    if not outside:
        return base
    if extend:
        log.info("extending the model's %s genes by %s genes of %s", f"{len(base):,}", f"{len(outside):,}", name)
        return GeneVocab([*base.genes, *outside])
    log.info("%s genes of %s are not in the model's vocabulary and are left out (%s adds them, e.g. %s)",
             f"{len(outside):,}", name, option("extend_genes", True), ", ".join(outside[:3]))
    return base
