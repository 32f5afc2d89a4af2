"""`evaluate`: one call that says how good a model is on a dataset, with numbers and pictures.

model + AnnData -> (1) masked-expression reconstruction vs gene-mean and kNN baselines,
(2) cell embeddings vs each label column (and batch mixing, with scib-metrics' integration
scores where it is installed and cells have labels) beside PCA baselines computed identically,
(3) gene embeddings vs annotation sources beside PCA loadings and a random embedding
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
from typing_extensions import Unpack

from exceiver.data.contract import ModelCells, ReadingOptions
from exceiver.data.labels import cell_labels, obs_column
from exceiver.data.sources import read_datasets
from exceiver.devices import inference_device
from exceiver.errors import ExceiverInputError
from exceiver.evaluate import plots
from exceiver.evaluate.baselines import cell_baselines, gene_loadings
from exceiver.evaluate.cells import batch_scores, depth_r2, label_scores
from exceiver.evaluate.genes import gene_scores, nearest_genes, read_annotations
from exceiver.evaluate.integration import INSTALL_HINT, scib_installed, scib_scores
from exceiver.evaluate.reconstruction import (
    baseline_predictions,
    masked_predictions,
    reconstruction_scores,
)
from exceiver.inference import CellModel, cell_embedding, check_model, check_pooling, gene_embedding_table, on_device
from exceiver.io import write_json
from exceiver.outputs import atomic_dir, claim

log = logging.getLogger(__name__)

# scib's stand-in for the uncorrected data (its PCR comparison): the PCA users would start from.
PRE_INTEGRATED = "pca50_hvg2000"
MIN_CELLS_PER_LABEL = 2  # kNN scores are cross-validated: every label needs a cell to fit and one to test


def evaluate(
    model: CellModel,
    data: ad.AnnData | str | Path,
    out: str | Path,
    *,
    label_keys: Sequence[str] = (),
    batch_key: str | None = None,
    annotations: str | Path | pd.DataFrame | None = None,
    sources: Sequence[str] | None = None,
    pooling: str | None = None,
    max_cells: int = 10000,
    device: str | None = None,
    progress: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    **reading: Unpack[ReadingOptions],
) -> dict:
    """Evaluate `model` on `data` and write a report to `out`; returns the metrics.

    Parameters
    ----------
    model
        A trained model (`exceiver.Exceiver.load(path)`; `Exceiver.evaluate` is the shortcut).
    data
        Raw counts (AnnData or an .h5ad path), read as the model reads data (`Exceiver.read`):
        mouse data through a human+mouse model's own gene map included.
    out
        The report folder: metrics.json, report.md, PNG figures and CSV tables.
    label_keys
        obs columns of annotations (cell type, tissue, ...) that embeddings should follow; each is
        scored on the evaluated cells that have a label (the others are counted in a logged
        warning), and needs 2 classes or more with 2 cells or more each
        (`exceiver.data.labels.cell_labels`, as in `finetune`).
    batch_key
        obs column of batches (assay, donor, ...) that embeddings should mix: neighbour batch
        entropy and batch silhouette for every representation and, with label keys and
        scib-metrics installed (`pip install 'exceiver[scib]'`), scib-metrics' bio conservation,
        batch correction and total against the first label key (`metrics["integration"]`).
    annotations, sources
        A gene annotation file (long TSV with gene_symbol, annotation_id, source; or GMT) or table
        (gene, term, source), and the sources to score (default: all in the file).
    pooling
        The cell embedding's readout (`Exceiver.embed`).
    max_cells
        A seeded sample of at most this many cells is evaluated (metrics are quadratic).
    **reading
        How the dataset is read: `gene_key`, `layer`, `gene_map`, `allow_non_integer`, `name`
        (the dataset's name in messages and the report; default: the file's name).

    Returns
    -------
    The metrics written to metrics.json.
    """
    inference_device(device)  # before any data is read
    pooling = check_pooling(pooling, check_model(model).module)
    with claim(out, overwrite=overwrite, folder=True):  # refused now, not after minutes of metrics
        [(default_name, adata)] = read_datasets(data)
        reading = {**reading, "name": reading.get("name") or default_name}
        for key in list(label_keys) + ([batch_key] if batch_key else []):
            obs_column(adata.obs, key, reading["name"])
        if annotations is not None and not isinstance(annotations, pd.DataFrame):
            annotations = read_annotations(annotations)
        cells = _sample(model.read(adata, empty="drop", **reading), max_cells, seed)  # every cell is checked
        return _evaluate(model, cells, out, label_keys=list(label_keys), batch_key=batch_key, annotations=annotations,
                         sources=sources, pooling=pooling, device=device, seed=seed, overwrite=overwrite,
                         progress=progress, every_cell=cells.n_cells == adata.n_obs)


def _sample(cells: ModelCells, max_cells: int, seed: int) -> ModelCells:
    """A seeded sample of at most `max_cells` of the cells, in their order."""
    if cells.n_left_out:
        log.warning("%s: %d cells have no counts in the model's trained genes and are left out", cells.name,
                    cells.n_left_out)
    if cells.n_cells <= max_cells:
        return cells
    return cells.subset(np.sort(np.random.default_rng(seed).choice(cells.n_cells, max_cells, replace=False)))


def _evaluate(model: CellModel, cells: ModelCells, out, *, label_keys: list[str], batch_key: str | None, annotations,
              sources, pooling: str, device, seed: int, overwrite: bool, progress: bool, every_cell: bool) -> dict:
    name, adata, counts = cells.name, cells.adata, cells.in_memory()
    # reconstruction, cell embeddings, depth R^2, each label key, batch mixing, gene embeddings, report
    scib = bool(batch_key and label_keys) and _scib_wanted()
    phases = Phases(4 + len(label_keys) + bool(batch_key) + scib + (annotations is not None))
    # Labels are judged on the cells evaluated: a sample can thin a class out.
    sample = name if every_cell else f"{name} ({cells.n_cells:,} evaluated cells)"
    labels = {key: cell_labels(adata.obs, key, min_cells=MIN_CELLS_PER_LABEL, name=sample) for key in label_keys}
    metrics: dict = {"dataset": name, "n_cells": cells.n_cells, "n_cells_without_model_genes": int(cells.n_left_out),
                     "n_genes_shared": int(counts.measured.sum()), "model": repr(model), "pooling": pooling}

    phases.start("reconstruction")
    with on_device(model.module, device) as on:
        entries = masked_predictions(model.module, counts, model.scaler, model.tokenizer, device=on, progress=progress)
    baselines = baseline_predictions(entries, counts.n_cells, len(model.vocab), seed=seed)
    metrics["reconstruction"] = reconstruction_scores(entries, baselines)

    phases.start("cell embeddings")
    representations = {"exceiver": cell_embedding(model, cells, pooling, device=device, progress=progress)}
    representations |= cell_baselines(adata, layer=cells.layer, seed=seed)
    log_depth = np.log1p(np.asarray(counts.counts.sum(axis=1)).ravel())
    phases.start("depth R^2")
    metrics["depth_r2"] = {rep: depth_r2(x, log_depth, seed=seed)
                           for rep, x in _each(representations, "depth R^2", progress)}
    metrics["cells"], profiles = _label_metrics(representations, labels, phases, seed, progress)
    if batch_key:
        phases.start("batch mixing")
        batches = adata.obs[batch_key].astype(str).to_numpy()
        metrics["batch"] = {"key": batch_key, **{rep: batch_scores(x, batches, seed=seed)
                                                 for rep, x in _each(representations, batch_key, progress)}}
    if scib:
        phases.start("scib-metrics integration scores")
        integration = _integration_metrics(representations, labels[label_keys[0]],
                                           adata.obs[batch_key].astype(str).to_numpy(), batch_key)
        if integration is not None:
            metrics["integration"] = integration
    neighbours = None
    if annotations is not None:
        phases.start("gene embeddings")
        metrics["genes"], neighbours = _gene_metrics(model, cells, annotations, sources, seed)

    phases.start("report and figures")
    with atomic_dir(out, overwrite=overwrite) as folder:
        _write_report(folder, metrics, representations, profiles, adata.obs[label_keys], neighbours, seed,
                      _value_words(model))
    phases.finish()
    return metrics


def _scib_wanted() -> bool:
    """Whether scib-metrics can score the integration (if not, say how to get it)."""
    if scib_installed():
        return True
    log.warning("evaluate: scib-metrics is not installed, so its integration scores are left out (%s)", INSTALL_HINT)
    return False


def _integration_metrics(representations: dict[str, np.ndarray], column, batches: np.ndarray,
                         batch_key: str) -> dict | None:
    """scib-metrics' bio conservation, batch correction and total of exceiver's embedding and the
    PCA baselines, on the cells that have a label (the HVG matrix itself is left out: it is no
    embedding), with the 50-component PCA of HVGs as the uncorrected data. None (said in a
    warning) where the labelled cells are in one batch or scib-metrics fails."""
    shown = {rep: x[column.labelled] for rep, x in representations.items() if rep != "hvg2000"}
    labelled_batches = batches[column.labelled]
    if len(np.unique(labelled_batches)) < 2:
        log.warning("evaluate: the cells labelled by %r are all in one %r batch: scib-metrics' integration scores "
                    "are left out", column.key, batch_key)
        return None
    try:
        scores = scib_scores(shown, column.values, labelled_batches, pre_integrated=PRE_INTEGRATED)
    except Exception as err:  # a third-party scorer: the report stands without its section
        log.warning("evaluate: scib-metrics failed (%s: %s); its integration scores are left out",
                    type(err).__name__, err)
        return None
    return {"batch_key": batch_key, "label_key": column.key, "pre_integrated": PRE_INTEGRATED,
            "n_cells": int(column.labelled.sum()), "representations": scores}


def _label_metrics(representations: dict[str, np.ndarray], labels: dict, phases: Phases, seed: int,
                   progress: bool) -> tuple[dict, dict]:
    """Each representation scored against each label column, and the similarity profiles."""
    scored, profiles = {}, {}
    for key, column in labels.items():
        phases.start(f"cell embeddings vs {key!r}")
        scores = {rep: label_scores(x[column.labelled], column.values, seed=seed)
                  for rep, x in _each(representations, key, progress)}
        profiles[key] = {rep: s.pop("profile") for rep, s in scores.items()}
        scored[key] = {"n_cells": int(column.labelled.sum()), "n_unlabelled_cells": int((~column.labelled).sum()),
                       "n_labels": len(column.counts), "representations": scores}
    return scored, profiles


def _gene_metrics(model: CellModel, cells: ModelCells, annotations: pd.DataFrame, sources,
                  seed: int) -> tuple[dict, pd.DataFrame]:
    """The model's gene embeddings against annotations, beside PCA loadings of the dataset's genes
    (named as the model names them) and a random embedding; and each gene's nearest genes."""
    gene_vectors = gene_embedding_table(model.module, model.vocab)[model.scaler.trained_genes]
    names = np.where(cells.gene_ids >= 0, np.asarray(model.vocab.genes, dtype=object)[cells.gene_ids], "").astype(str)
    loadings = gene_loadings(cells.adata, names, layer=cells.layer, seed=seed)
    genes = gene_vectors.index.intersection(loadings.index)
    if len(genes) < 10:
        raise ExceiverInputError(f"{cells.name}: only {len(genes)} genes have both a trained embedding and expression")
    random = np.random.default_rng(seed).standard_normal((len(genes), gene_vectors.shape[1]))
    vectors = {"exceiver": gene_vectors.loc[genes].to_numpy(), "pca_loadings": loadings.loc[genes].to_numpy(),
               "random": random}
    return (gene_scores(vectors, pd.Index(genes), annotations, sources=sources, seed=seed),
            nearest_genes(gene_vectors.to_numpy(), gene_vectors.index))


def _value_words(model: CellModel) -> str:
    """What the reconstruction's values are, in the report's words."""
    if model.scaler.standardise:
        return "values are z-scored log-normalised expression + 1"
    return "values are log-normalised expression (log1p of counts per 1e4)"


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
                  neighbours: pd.DataFrame | None, seed: int, value_words: str) -> None:
    write_json(metrics, folder / "metrics.json")
    lines = [f"# Exceiver evaluation: {metrics['dataset']}", "",
             f"{metrics['model']}; {metrics['n_cells']:,} cells, {metrics['n_genes_shared']:,} genes shared with "
             f"the model; cell embedding: {POOLING_WORDS[metrics['pooling']]}.", ""]
    rec = metrics["reconstruction"]
    lines += ["## Masked-expression reconstruction", "",
              f"15% of each cell's expressed genes masked (fixed seed), {rec['model']['n']:,} masked values in "
              f"{rec['n_cells']:,} cells; {value_words}.", "",
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
    if "integration" in metrics:
        i = metrics["integration"]
        lines += [f"## Integration (scib-metrics; batches `{i['batch_key']}`, cell types `{i['label_key']}`)", "",
                  "scib-metrics' default metrics, not min-max scaled; total = 0.6 bio + 0.4 batch. "
                  f"Uncorrected data: {i['pre_integrated']}.", "",
                  "| representation | bio conservation | batch correction | total |", "|---|---|---|---|"]
        lines += [f"| {rep} | {s['bio']:.3f} | {s['batch']:.3f} | {s['total']:.3f} |"
                  for rep, s in i["representations"].items()] + [""]
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
