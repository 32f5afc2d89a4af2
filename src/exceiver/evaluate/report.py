"""`evaluate`: one call that says how good a model is on a dataset, with numbers and pictures.

model + AnnData -> (1) masked-expression reconstruction vs gene-mean and kNN baselines,
(2) cell embeddings vs each label column (and batch mixing) beside PCA baselines computed
identically, (3) gene embeddings vs annotation sources beside PCA loadings and a random embedding
-> REPORT_DIR/metrics.json, report.md, PNG figures and CSV tables, written atomically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from exceiver.data.cells import align
from exceiver.data.counts import count_layers, counts_var
from exceiver.data.labels import cell_labels, obs_column
from exceiver.data.sources import read_datasets
from exceiver.data.vocab import dataset_genes
from exceiver.devices import inference_device
from exceiver.errors import ExceiverInputError
from exceiver.evaluate import plots
from exceiver.evaluate.baselines import cell_baselines, gene_loadings
from exceiver.evaluate.cells import batch_scores, depth_r2, label_scores
from exceiver.evaluate.genes import gene_scores, nearest_genes, read_annotations
from exceiver.evaluate.reconstruction import (
    baseline_predictions,
    masked_predictions,
    reconstruction_scores,
)
from exceiver.io import write_json
from exceiver.outputs import atomic_dir, claim
from exceiver.model import Exceiver, check_pooling

log = logging.getLogger(__name__)

MIN_CELLS_PER_LABEL = 2  # kNN scores are cross-validated: every label needs a cell to fit and one to test


def evaluate(
    model: Exceiver | str | Path,
    data: ad.AnnData | str | Path,
    out: str | Path,
    *,
    label_keys: Sequence[str] = (),
    batch_key: str | None = None,
    gene_key: str | None = None,
    layer: str | None = None,
    annotations: str | Path | pd.DataFrame | None = None,
    sources: Sequence[str] | None = None,
    pooling: str | None = None,
    max_cells: int = 10000,
    device: str | None = None,
    seed: int = 0,
    allow_non_integer: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    name: str | None = None,
) -> dict:
    """Evaluate `model` on `data` and write a report to `out`; returns the metrics.

    label_keys: obs columns of annotations (cell type, tissue, ...) that embeddings should follow;
        each is scored on the evaluated cells that have a label (the others are counted in a logged
        warning), and needs 2 classes or more with 2 cells or more each
        (`exceiver.data.labels.cell_labels`, as in `finetune`).
    batch_key: obs column of batches (assay, donor, ...) that embeddings should mix.
    annotations: gene annotation file (long TSV with gene_symbol, annotation_id, source; or GMT)
        or table (gene, term, source); sources: the sources to score (default: all in the file).
    max_cells: a seeded sample of at most this many cells is evaluated (metrics are quadratic).
    gene_key, layer, allow_non_integer: where the counts and gene identifiers are, as in `pretrain`.
    name: the dataset's name in messages and the report (default: the file's name).
    """
    inference_device(device)  # before any data is read
    with claim(out, overwrite=overwrite, folder=True):  # refused now, not after minutes of metrics
        return _evaluate(model, data, out, label_keys=label_keys, batch_key=batch_key, gene_key=gene_key, layer=layer,
                         annotations=annotations, sources=sources, pooling=pooling, max_cells=max_cells, device=device,
                         seed=seed, allow_non_integer=allow_non_integer, overwrite=overwrite, progress=progress,
                         name=name)


def _evaluate(model, data, out, *, label_keys, batch_key, gene_key, layer, annotations, sources, pooling, max_cells,
              device, seed, allow_non_integer, overwrite, progress, name) -> dict:
    model = model if isinstance(model, Exceiver) else Exceiver.load(model)
    pooling = check_pooling(pooling, model.module)
    [(default_name, adata)] = read_datasets(data)
    name = name or default_name
    label_keys = list(label_keys)
    for key in label_keys + ([batch_key] if batch_key else []):
        obs_column(adata.obs, key, name)
    if annotations is not None and not isinstance(annotations, pd.DataFrame):
        annotations = read_annotations(annotations)

    gene_key, layer = model.data_keys(adata.var.columns, count_layers(adata), gene_key, layer)
    aligned = align(adata, model.vocab, gene_key=gene_key, layer=layer, name=name,
                    allow_non_integer=allow_non_integer)  # every cell is checked, not only the sample
    usable = np.flatnonzero(aligned.keep_genes(model.scaler.trained_genes).n_genes_expressed > 0)
    if not len(usable):
        raise ExceiverInputError(f"{name}: no cell has counts in the genes the model was trained on")
    n_without = aligned.n_cells - len(usable)
    if n_without:
        log.warning("%s: %d cells have no counts in the model's trained genes and are left out", name, n_without)
    picked = np.sort(np.random.default_rng(seed).choice(len(usable), max_cells, replace=False)) \
        if len(usable) > max_cells else np.arange(len(usable))
    rows = usable[picked]
    cells = aligned.subset(rows).keep_genes(model.scaler.trained_genes)
    adata = adata[rows].copy()
    # reconstruction, cell embeddings, depth R^2, each label key, batch mixing, gene embeddings, report
    phases = Phases(4 + len(label_keys) + bool(batch_key) + (annotations is not None))
    # Labels are judged on the cells evaluated: a sample can thin a class out.
    sample = name if len(rows) == aligned.n_cells else f"{name} ({len(rows):,} evaluated cells)"
    labels = {key: cell_labels(adata.obs, key, min_cells=MIN_CELLS_PER_LABEL, name=sample) for key in label_keys}
    metrics: dict = {"dataset": name, "n_cells": len(rows), "n_cells_without_model_genes": int(n_without),
                     "n_genes_shared": int(cells.measured.sum()), "model": repr(model), "pooling": pooling}

    phases.start("reconstruction")
    with model.on_device(device) as on:
        entries = masked_predictions(model.module, cells, model.scaler, model.tokenizer, device=on, progress=progress)
    baselines = baseline_predictions(entries, cells.n_cells, len(model.vocab), seed=seed)
    metrics["reconstruction"] = reconstruction_scores(entries, baselines)

    phases.start("cell embeddings")
    representations = {"exceiver": model.embed(adata, pooling=pooling, inplace=False, gene_key=gene_key,
                                                layer=layer, device=device, allow_non_integer=allow_non_integer,
                                                name=name, progress=progress)}
    representations |= cell_baselines(adata, layer=layer, seed=seed)
    log_depth = np.log1p(np.asarray(cells.counts.sum(axis=1)).ravel())
    phases.start("depth R^2")
    metrics["depth_r2"] = {rep: depth_r2(x, log_depth, seed=seed)
                           for rep, x in _each(representations, "depth R^2", progress)}
    metrics["cells"], profiles = {}, {}
    for key, column in labels.items():
        phases.start(f"cell embeddings vs {key!r}")
        scores = {rep: label_scores(x[column.labelled], column.values, seed=seed)
                  for rep, x in _each(representations, key, progress)}
        profiles[key] = {rep: s.pop("profile") for rep, s in scores.items()}
        metrics["cells"][key] = {"n_cells": int(column.labelled.sum()),
                                 "n_unlabelled_cells": int((~column.labelled).sum()), "n_labels": len(column.counts),
                                 "representations": scores}
    if batch_key:
        phases.start("batch mixing")
        batches = adata.obs[batch_key].astype(str).to_numpy()
        metrics["batch"] = {"key": batch_key, **{rep: batch_scores(x, batches, seed=seed)
                                                 for rep, x in _each(representations, batch_key, progress)}}

    neighbours = None
    if annotations is not None:
        phases.start("gene embeddings")
        gene_vectors = model.gene_embeddings()[model.scaler.trained_genes]
        loadings = gene_loadings(adata, dataset_genes(counts_var(adata, layer, name), gene_key), layer=layer, seed=seed)
        genes = gene_vectors.index.intersection(loadings.index)
        if len(genes) < 10:
            raise ExceiverInputError(f"{name}: only {len(genes)} genes have both a trained embedding and expression")
        random = np.random.default_rng(seed).standard_normal((len(genes), gene_vectors.shape[1]))
        vectors = {"exceiver": gene_vectors.loc[genes].to_numpy(), "pca_loadings": loadings.loc[genes].to_numpy(),
                   "random": random}
        metrics["genes"] = gene_scores(vectors, pd.Index(genes), annotations, sources=sources, seed=seed)
        neighbours = nearest_genes(gene_vectors.to_numpy(), gene_vectors.index)

    phases.start("report and figures")
    with atomic_dir(out, overwrite=overwrite) as folder:
        _write_report(folder, metrics, representations, profiles, adata.obs[label_keys], neighbours, seed)
    phases.finish()
    return metrics


class Phases:
    """Log lines through a long evaluation: which phase runs (n of N), and at the end how long
    each took, so that minutes of metrics are not minutes of silence."""

    def __init__(self, n_phases: int) -> None:
        self.n_phases, self.seconds = n_phases, []
        self.current, self.started = None, time.perf_counter()

    def start(self, name: str) -> None:
        self._stop()
        self.current, self.started = name, time.perf_counter()
        log.info("evaluate: %s (%d/%d)...", name, len(self.seconds) + 1, self.n_phases)

    def finish(self) -> None:
        self._stop()
        log.info("evaluate: done in %.0f s (%s)", sum(s for _, s in self.seconds),
                 ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds))

    def _stop(self) -> None:
        if self.current is not None:
            self.seconds.append((self.current, time.perf_counter() - self.started))


def _each(representations: dict[str, np.ndarray], what: str, progress: bool):
    """The representations one by one, with a progress bar (each takes seconds on 10,000 cells)."""
    return tqdm(representations.items(), desc=what, unit="representation", disable=not progress, leave=False)


POOLING_WORDS = {"bottleneck": "the cell bottleneck", "mean": "mean of the latents",
                 "flatten": "all latents flattened"}


def _write_report(folder: Path, metrics: dict, representations: dict[str, np.ndarray],
                  profiles: dict[str, dict[str, pd.DataFrame]], labels: pd.DataFrame,
                  neighbours: pd.DataFrame | None, seed: int) -> None:
    write_json(metrics, folder / "metrics.json")
    lines = [f"# Exceiver evaluation: {metrics['dataset']}", "",
             f"{metrics['model']}; {metrics['n_cells']:,} cells, {metrics['n_genes_shared']:,} genes shared with "
             f"the model; cell embedding: {POOLING_WORDS[metrics['pooling']]}.", ""]
    rec = metrics["reconstruction"]
    lines += ["## Masked-expression reconstruction", "",
              f"15% of each cell's expressed genes masked (fixed seed), {rec['model']['n']:,} masked values in "
              f"{rec['n_cells']:,} cells; values are z-scored log-normalised expression + 1.", "",
              "| method | MSE | MSE / gene mean | Pearson r | explained variance |", "|---|---|---|---|---|"]
    for method in ("model", "gene_mean", "knn"):
        r = rec[method]
        lines.append(f"| {method} | {r['mse']:.4f} | {r['mse_ratio']:.3f} | {r['pearson']:.3f} | "
                     f"{r['explained_variance']:.3f} |")
    lines += ["", "![reconstruction by decile](reconstruction_deciles.png)", ""]
    plots.reconstruction_by_decile(rec["deciles"], folder / "reconstruction_deciles.png")

    for key, cell in metrics["cells"].items():
        reps = cell["representations"]
        lines += [f"## Cell embeddings vs `{key}` ({cell['n_labels']} labels, {cell['n_cells']:,} cells)", "",
                  "| representation | kNN accuracy | kNN macro-F1 | Leiden ARI | Leiden NMI | silhouette | "
                  "cosine within - between |", "|---|---|---|---|---|---|---|"]
        for rep, s in reps.items():
            lines.append(f"| {rep} | {s['knn_accuracy']:.3f} | {s['knn_macro_f1']:.3f} | {s['leiden_ari']:.3f} | "
                         f"{s['leiden_nmi']:.3f} | {s['silhouette']:.3f} | {s['cosine_gap']:.3f} |")
        best = best_pca(reps)
        for rep in ("exceiver", best):
            profiles[key][rep].to_csv(folder / f"similarity_{key}_{rep}.csv")
        plots.similarity_heatmaps({rep: profiles[key][rep] for rep in ("exceiver", best)},
                                  folder / f"similarity_{key}.png", f"similarity profile by {key}")
        lines += ["", "kNN: 15 neighbours, 5-fold stratified cross-validation. Leiden: resolution 1 on a "
                  "15-neighbour graph. Similarity profile: mean cosine similarity between the cells of two groups.",
                  "", f"![similarity profile](similarity_{key}.png)", ""]
    lines += ["## How much of each representation is sequencing depth", "",
              "Cross-validated R^2 of a ridge regression of log total counts (model genes) on the representation "
              "(1: depth is fully readable; identity-focused embeddings should stay low).", "",
              "| representation | depth R^2 |", "|---|---|"]
    lines += [f"| {rep} | {r2:.3f} |" for rep, r2 in metrics["depth_r2"].items()] + [""]
    if "batch" in metrics:
        b = metrics["batch"]
        lines += [f"## Batch mixing (`{b['key']}`)", "", "| representation | kNN batch entropy | 1 - abs(batch ASW) |",
                  "|---|---|---|"]
        lines += [f"| {rep} | {s['batch_entropy']:.3f} | {s['batch_asw']:.3f} |"
                  for rep, s in b.items() if rep != "key"]
        lines.append("")
    if len(labels.columns):
        shown = {rep: representations[rep] for rep in ("exceiver", best_pca(
            metrics["cells"][labels.columns[0]]["representations"]))}
        plots.umaps(shown, labels, folder / "umap.png", seed=seed)
        lines += ["## UMAPs", "", "![UMAP](umap.png)", ""]
    if "genes" in metrics:
        g = metrics["genes"]
        names = list(next(iter(g["auroc"].values()))) if g["auroc"] else []
        lines += ["## Gene embeddings vs annotations", "",
                  f"{g['n_genes']:,} genes with a trained embedding and expression here. AUROC of cosine "
                  "similarity for gene pairs sharing a gene set of 5-500 genes vs pairs sharing none.", "",
                  "| source | positive pairs | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for source, scores in g["auroc"].items():
            lines.append(f"| {source} | {g['positive_pairs'][source]:,} | "
                         + " | ".join(f"{scores[n]:.3f}" for n in names) + " |")
        if g["auroc"]:
            plots.gene_aurocs(g["auroc"], folder / "gene_auroc.png")
            lines += ["", "![gene AUROC](gene_auroc.png)"]
        if neighbours is not None and len(neighbours):
            neighbours.to_csv(folder / "gene_neighbours.csv", index=False)
            lines += ["", "Nearest genes in the model's embedding (cosine similarity):", "",
                      "| gene | nearest genes |", "|---|---|"]
            lines += [f"| {r.gene} | {r.neighbours} |" for r in neighbours.itertuples()]
        lines.append("")
    (folder / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def best_pca(representations: dict[str, dict]) -> str:
    """The PCA recipe with the highest kNN macro-F1 (the baseline to beat)."""
    pcas = [rep for rep in representations if rep.startswith("pca")]
    return max(pcas, key=lambda rep: representations[rep]["knn_macro_f1"])
