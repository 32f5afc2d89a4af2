"""Do gene embeddings follow biology? Pairs of genes that share an annotation (GO term, pathway,
complex) should be more similar than pairs that do not.

Annotations come from the user: a long table (TSV/CSV with columns gene_symbol, annotation_id,
source; gzip allowed) or a GMT file (one gene set per line; the file name is the source). The
project ships no annotation data.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import normalize

from exceiver.errors import ExceiverInputError

MIN_SET, MAX_SET = 5, 500  # gene sets used for positive pairs: neither tiny nor near-universal
WELL_KNOWN = ["CD3E", "CD8A", "MS4A1", "CD14", "LYZ", "NKG7", "HBB", "GAPDH", "MKI67", "TOP2A", "EPCAM",
              "KRT14", "COL1A1", "SNAP25", "ALB", "INS", "STAT1", "IRF7", "RPL13", "MT-CO1"]


def read_annotations(path: str | Path) -> pd.DataFrame:
    """(gene, term, source) rows from a long table or a GMT file."""
    path = Path(path)
    if not path.is_file():
        raise ExceiverInputError(f"annotation file {path} does not exist")
    name = path.name.lower().removesuffix(".gz")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        if name.endswith(".gmt"):
            rows = []
            with opener(path, "rt", encoding="utf-8") as f:
                for line in f:
                    fields = line.rstrip("\n").split("\t")
                    rows += [(g, fields[0]) for g in fields[2:] if g]
            table = pd.DataFrame(rows, columns=["gene", "term"]).assign(source=Path(name).stem)
        else:
            table = pd.read_csv(path, sep="," if name.endswith(".csv") else "\t", dtype=str)
            missing = {"gene_symbol", "annotation_id"} - set(table.columns)
            if missing:
                raise ExceiverInputError(
                    f"annotation table {path} lacks columns {sorted(missing)}; it needs gene_symbol, "
                    f"annotation_id and optionally source (found {list(table.columns)[:5]})")
            table = table.rename(columns={"gene_symbol": "gene", "annotation_id": "term"})
            if "source" not in table.columns:
                table["source"] = Path(name).stem
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise ExceiverInputError(f"cannot read annotation file {path} ({err})") from err
    table = table[["gene", "term", "source"]].dropna().drop_duplicates()
    if table.empty:
        raise ExceiverInputError(f"annotation file {path} holds no annotations")
    return table


def sample_pairs(table: pd.DataFrame, genes: pd.Index, *, n_pairs: int = 20000,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """Gene index pairs of one source and whether each pair shares a term. Positives: a gene set
    of 5-500 genes drawn with probability proportional to its number of pairs, then two of its
    genes (so every sharing pair is about equally likely); negatives: two genes of those sets drawn
    at random that share none of them. Only `genes` are used; None when there are too few."""
    table = table[table.gene.isin(genes)]
    sizes = table.groupby("term").gene.nunique()
    table = table[table.term.isin(sizes[(sizes >= MIN_SET) & (sizes <= MAX_SET)].index)]
    members = table.groupby("term").gene.apply(lambda g: genes.get_indexer(g.unique()))
    annotated = genes.get_indexer(table.gene.unique())
    if len(members) == 0 or len(annotated) < 10:
        return None
    terms_of = table.assign(i=genes.get_indexer(table.gene)).groupby("i").term.apply(frozenset).to_dict()
    rng = np.random.default_rng(seed)
    weights = np.array([len(m) * (len(m) - 1) for m in members], dtype=np.float64)
    picks = rng.choice(len(members), size=n_pairs, p=weights / weights.sum())
    positives = np.array([rng.choice(members.iloc[t], 2, replace=False) for t in picks])
    negatives = np.zeros((0, 2), dtype=np.int64)
    for _ in range(50):  # rejection sampling; sets of at most 500 genes leave most pairs unshared
        draw = rng.choice(annotated, size=(2 * n_pairs, 2))
        draw = draw[draw[:, 0] != draw[:, 1]]
        unshared = np.array([not terms_of[a] & terms_of[b] for a, b in draw], dtype=bool)
        negatives = np.vstack([negatives, draw[unshared]])
        if len(negatives) >= n_pairs:
            break
    negatives = negatives[:n_pairs]
    pairs = np.vstack([positives, negatives]).astype(np.int64)
    return pairs, np.r_[np.ones(len(positives)), np.zeros(len(negatives))]


def pair_auroc(vectors: np.ndarray, pairs: np.ndarray, shared: np.ndarray) -> float:
    """AUROC with which cosine similarity separates sharing from non-sharing pairs."""
    unit = normalize(vectors.astype(np.float64))
    cosine = (unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(1)
    return float(roc_auc_score(shared, cosine))


def gene_scores(representations: dict[str, np.ndarray], genes: pd.Index, annotations: pd.DataFrame, *,
                sources: list[str] | None = None, seed: int = 0) -> dict:
    """AUROC of each representation (rows aligned with `genes`) for each annotation source."""
    available = sorted(annotations.source.unique())
    unknown = sorted(set(sources or []) - set(available))
    if unknown:
        raise ExceiverInputError(f"annotation sources {unknown} are not in the file; it has {available}")
    scores, pairs_used = {}, {}
    for source in sources or available:
        sampled = sample_pairs(annotations[annotations.source == source], genes, seed=seed)
        if sampled is None:
            continue
        pairs, shared = sampled
        scores[source] = {name: pair_auroc(v, pairs, shared) for name, v in representations.items()}
        pairs_used[source] = int(shared.sum())
    return {"auroc": scores, "positive_pairs": pairs_used, "n_genes": len(genes)}


def nearest_genes(vectors: np.ndarray, genes: pd.Index, queries: list[str] | None = None, k: int = 5) -> pd.DataFrame:
    """The k most cosine-similar genes of each query gene present (a table to eyeball)."""
    unit = normalize(vectors.astype(np.float64))
    rows = []
    for gene in [g for g in (queries or WELL_KNOWN) if g in genes]:
        i = genes.get_loc(gene)
        sim = unit @ unit[i]
        sim[i] = -np.inf
        top = np.argsort(-sim)[:k]
        rows.append({"gene": gene, "neighbours": ", ".join(f"{genes[j]} ({sim[j]:.2f})" for j in top)})
    return pd.DataFrame(rows, columns=["gene", "neighbours"])
