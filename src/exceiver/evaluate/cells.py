"""Do cell embeddings separate annotated cell groups (and mix batches)?

Every representation (Exceiver's or a baseline's) goes through the same functions, so the numbers
are comparable: kNN classification (cross-validated), Leiden clusters vs labels, silhouette, the
paper's similarity profile (mean cosine similarity within and between label groups) and, with a
batch column, batch mixing.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from sklearn.metrics import (accuracy_score, adjusted_rand_score, f1_score, normalized_mutual_info_score, r2_score,
                             silhouette_score)
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from sklearn.preprocessing import normalize

K_NEIGHBOURS = 15
SILHOUETTE_SAMPLE = 5000


def knn_scores(embedding: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
               k: int = K_NEIGHBOURS) -> dict[str, float]:
    """Accuracy and macro-F1 of a k-nearest-neighbour classifier fitted on `train` cells and
    scored on held-out `test` cells (Euclidean distance)."""
    labels = np.asarray(labels).astype(str)
    knn = KNeighborsClassifier(n_neighbors=min(k, len(train))).fit(embedding[train], labels[train])
    predicted = knn.predict(embedding[test])
    return {
        "accuracy": float(accuracy_score(labels[test], predicted)),
        "macro_f1": float(f1_score(labels[test], predicted, average="macro")),
    }


def knn_cross_validated(embedding: np.ndarray, labels: np.ndarray, *, k: int = K_NEIGHBOURS, folds: int = 5,
                        seed: int = 0) -> dict[str, float]:
    """kNN accuracy and macro-F1, each cell predicted by a classifier that did not see it
    (stratified folds; fewer folds when the rarest label has fewer cells)."""
    folds = int(min(folds, pd.Series(labels).value_counts().min()))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    k = min(k, int(len(labels) * (folds - 1) / folds))
    predicted = cross_val_predict(KNeighborsClassifier(n_neighbors=k), embedding, labels, cv=splitter)
    return {"knn_accuracy": float(accuracy_score(labels, predicted)),
            "knn_macro_f1": float(f1_score(labels, predicted, average="macro"))}


def leiden_clusters(embedding: np.ndarray, *, resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    """Leiden clusters of the embedding's kNN graph (scanpy's standard recipe)."""
    graph = ad.AnnData(np.zeros((len(embedding), 0), dtype=np.float32), obsm={"rep": embedding})
    sc.pp.neighbors(graph, n_neighbors=K_NEIGHBOURS, use_rep="rep", random_state=seed)
    sc.tl.leiden(graph, resolution=resolution, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
    return graph.obs["leiden"].to_numpy()


def similarity_profile(embedding: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Mean cosine similarity between the cells of each pair of label groups (label x label)."""
    unit = normalize(embedding.astype(np.float64))
    groups = pd.Categorical(labels)
    onehot = np.eye(len(groups.categories))[groups.codes]  # cells x groups
    sums = onehot.T @ unit  # group sums of unit vectors
    sizes = onehot.sum(0)
    total = sums @ sums.T
    pairs = np.outer(sizes, sizes)
    np.fill_diagonal(total, np.diag(total) - sizes)  # leave out each cell's similarity to itself
    np.fill_diagonal(pairs, sizes * (sizes - 1))
    profile = np.divide(total, pairs, out=np.full_like(total, np.nan), where=pairs > 0)
    return pd.DataFrame(profile, index=groups.categories, columns=groups.categories)


def label_scores(embedding: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> dict:
    """All label metrics of one representation; `profile` is the similarity matrix."""
    labels = np.asarray(labels).astype(str)
    clusters = leiden_clusters(embedding, seed=seed)
    profile = similarity_profile(embedding, labels)
    within = float(np.nanmean(np.diag(profile.to_numpy())))
    off = profile.to_numpy()[~np.eye(len(profile), dtype=bool)]
    sample = min(SILHOUETTE_SAMPLE, len(labels))
    return {
        **knn_cross_validated(embedding, labels, seed=seed),
        "leiden_ari": float(adjusted_rand_score(labels, clusters)),
        "leiden_nmi": float(normalized_mutual_info_score(labels, clusters)),
        "n_clusters": int(len(set(clusters))),
        "silhouette": float(silhouette_score(embedding, labels, sample_size=sample, random_state=seed)),
        "cosine_within": within,
        "cosine_between": float(np.nanmean(off)) if len(off) else float("nan"),
        "cosine_gap": within - float(np.nanmean(off)) if len(off) else float("nan"),
        "profile": profile,
    }


def batch_scores(embedding: np.ndarray, batches: np.ndarray, *, k: int = K_NEIGHBOURS, seed: int = 0) -> dict:
    """Batch mixing: normalised entropy of batch labels among each cell's k neighbours (1: as
    mixed as the batch sizes allow, 0: neighbours all from the cell's own batch), and 1 - |batch
    silhouette| (1: batches overlap)."""
    batches = np.asarray(batches).astype(str)
    codes = pd.Categorical(batches).codes
    n_batches = codes.max() + 1
    if n_batches < 2:
        return {"batch_entropy": float("nan"), "batch_asw": float("nan")}
    k = min(k, len(batches) - 1)
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding, return_distance=False)[:, 1:]
    freq = np.stack([(codes[neighbours] == b).mean(1) for b in range(n_batches)], axis=1)
    entropy = -(freq * np.log(np.where(freq > 0, freq, 1))).sum(1) / np.log(n_batches)
    sample = min(SILHOUETTE_SAMPLE, len(batches))
    asw = silhouette_score(embedding, batches, sample_size=sample, random_state=seed)
    return {"batch_entropy": float(entropy.mean()), "batch_asw": float(1 - abs(asw))}


DEPTH_ALPHAS = np.logspace(-3, 3, 7)


def depth_r2(embedding: np.ndarray, log_depth: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated R^2 of a ridge regression of log total counts on the embedding: how much of
    a representation is sequencing depth rather than identity."""
    splitter = KFold(n_splits=min(folds, len(log_depth)), shuffle=True, random_state=seed)
    x, y = np.asarray(embedding, dtype=np.float64), np.asarray(log_depth, dtype=np.float64)
    predicted = np.empty_like(y)
    for train, test in splitter.split(x):
        predicted[test] = ridge_loo_predict(x[train], y[train], x[test])
    return float(r2_score(y, predicted))


def ridge_loo_predict(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, alphas: np.ndarray = DEPTH_ALPHAS) -> np.ndarray:
    """Predictions of a ridge regression (with intercept) whose alpha has the least leave-one-out
    squared error: sklearn's RidgeCV, from one eigendecomposition. RidgeCV solves a features^3
    system per alpha, which made the 2,000 HVGs' depth R^2 most of an evaluation's time."""
    x_mean, y_mean = x.mean(0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    # scores: the cells on the principal axes (column norms^2 = eigvals), from the smaller Gram
    # matrix; the coefficients of a shrinkage are basis @ (shrink * weights).
    if xc.shape[1] <= xc.shape[0]:
        eigvals, axes = np.linalg.eigh(xc.T @ xc)
        scores = xc @ axes
        basis, weights = axes, scores.T @ yc
    else:
        eigvals, cells = np.linalg.eigh(xc @ xc.T)
        eigvals = np.clip(eigvals, 0, None)
        scores = cells * np.sqrt(eigvals)
        basis, weights = xc.T @ cells, cells.T @ yc
    projected = scores.T @ yc
    best_error, best = None, None
    for alpha in alphas:
        shrink = 1.0 / (eigvals + alpha)
        residual = yc - scores @ (shrink * projected)
        leverage = (scores**2) @ shrink + 1.0 / len(y)  # the intercept's share of each fit
        error = np.mean((residual / (1.0 - leverage)) ** 2)
        if best is None or error < best_error:  # the first of equals, as RidgeCV
            best_error, best = error, shrink
    return (x_new - x_mean) @ (basis @ (best * weights)) + y_mean
