"""Data integration: does exceiver with a batch key mix batches and keep cell types as well as scVI
with its batch key, judged by the field's own scores (scib-metrics) on files with real batches?

Each target is a shared file with batches and cell-type labels: cellbench (two assays), zilionis
(mouse lung immune cells of 4 mice), mca (mouse stomach and intestine, 5 batches, each of one
tissue) and cider (pancreas of 4 human donors and 2 mice: species is a batch effect here); and one
built from four PBMC files of four 10x technologies, labelled from pbmc3k (`pbmc_technologies.py`:
how, and the check that the labels are sound). Kang has no cell-type column: left out. On the
same file, with the same threads, in the same run:
- uncorrected PCA (the recipe `pca_hvg2000_seurat_scaled_50`) and, where harmonypy is installed,
  Harmony on that PCA;
- scVI as its tutorial trains it with the batch key (`common.scvi_baseline`, default epochs), timed;
- exceiver: the pretrained model (`--init`) continued on the file with the batch key for scVI's
  measured training time (no early stop; `--init-set FIELD=VALUE`: its integration settings, e.g.
  `--init-set bottleneck_variance=learned --init-set bottleneck_kl=1`), and the same model
  zero-shot (not trained on the file in this run; the table says whether the file was in that
  model's pretraining corpus, labels unseen);
  with `--scratch`, also the `default` preset trained on the file alone with the batch key for
  scVI's time, with `--set FIELD=VALUE` overrides (e.g. `--set bottleneck_variance=learned`).

Every embedding is scored in one scib-metrics `Benchmarker` (default bio-conservation and
batch-correction metrics, the PCA as the pre-integration embedding, scores not min-max scaled
between methods: bio, batch, total = 0.6 bio + 0.4 batch), and by the project's own neighbour
scores: cell-type kNN macro-F1 (k=15, 5-fold); mixing, the entropy of batches among each cell's
15 neighbours of its own type divided by that type's own batch entropy (1: as mixed as the type's
batches allow; a type with unequal batches can score a little above 1 where its neighbours are more
balanced than the type; types of 16 cells or fewer cannot be judged: none of mca's can); transfer, the
macro-F1 of labels carried by kNN (k=15) from the largest batch (for cellbench the CEL-seq2 cells)
to the other batches' cells of the types it has.

    pip install -c benchmarks/constraints.txt -e ".[bench]"
    EXCEIVER_SHARED=../shared python benchmarks/integration.py --out integration.json --threads 2
    # a quick check of the script: a subsample, scVI for 6 seconds
    EXCEIVER_SHARED=../shared python benchmarks/integration.py --out check.json --targets mca \
        --max-cells 150 --scvi-minutes 0.1 --threads 1
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common import (TARGETS as SHARED_TARGETS, Target, add_model_overrides_option, add_targets_option,
                    add_threads_option, benchmark_parser, pca_hvg2000_seurat_scaled_50, pca_legend, quiet,
                    read_result, scvi_baseline, shared_folder, threads, write_result)
from pbmc_technologies import PbmcTechnologies
from exceiver import Exceiver, pretrain
from exceiver.cli_parser import model_option
from exceiver.evaluate.cells import K_NEIGHBOURS, knn_cross_validated, knn_scores
from exceiver.evaluate.integration import scib_scores
from exceiver.shipped import DEFAULT_MODEL

# Mouse symbols: the model's gene map reads mca's; zilionis' (upper-cased) and cider's mouse cells
# (upper-cased onto the human symbols, one matrix for both species) are read as human symbols.
TARGETS = {
    "cellbench": SHARED_TARGETS["cellbench"],
    "zilionis": Target("zilionis2019_mouse_lung_immune_800", "cell_type", batch_key="donor", species="mouse"),
    "mca": Target("mca_mouse_stomach_intestine_scgoclust_219", "cell_type", batch_key="batch", species="mouse"),
    "cider": Target("cider_baron_pancreas_350", "cell_type", batch_key="donor", species="human and mouse"),
    "pbmc_technologies": PbmcTechnologies(),  # built from four files: pbmc_technologies.py
}
PCA_RECIPE = "pca_hvg2000_seurat_scaled_50"
METHODS = [PCA_RECIPE, "harmony", "scvi", "exceiver_zero_shot", "exceiver_continued", "exceiver_scratch"]


def subsample(adata, max_cells: int | None, seed: int = 0):
    """A seeded random `max_cells` of the cells (all where None or more), for quick checks."""
    if not max_cells or adata.n_obs <= max_cells:
        return adata
    rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, max_cells, replace=False))
    return adata[rows].copy()


def entropy(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of counts."""
    freq = counts / counts.sum(-1, keepdims=True)
    return -(freq * np.log(np.where(freq > 0, freq, 1))).sum(-1)


def same_type_mixing(embedding: np.ndarray, labels: np.ndarray, batches: np.ndarray, k: int = K_NEIGHBOURS) -> float:
    """Mean over cells of the batch entropy among a cell's k nearest neighbours of its own type,
    divided by the entropy of that type's batch sizes (1: as mixed as the type's batches; a type of
    unequal batches can score a little above 1). Types with one batch are left out, and so
    are types of k + 1 cells or fewer: their neighbours would be all the type's other cells, the
    same in every embedding.

    Parameters
    ----------
    embedding
        Cells x dimensions.
    labels, batches
        Cell type and batch of each cell.
    k
        Neighbours (at most the type's other cells).

    Returns
    -------
    1 where every type's neighbourhoods are as mixed as its batches, 0 where each cell's
    neighbours all share its batch; NaN where no type is left.
    """
    from sklearn.neighbors import NearestNeighbors

    labels, codes = np.asarray(labels), pd.Categorical(np.asarray(batches)).codes
    n_batches, scores = codes.max() + 1, []
    for label in np.unique(labels):
        cells = np.flatnonzero(labels == label)
        own = entropy(np.bincount(codes[cells], minlength=n_batches).astype(float))
        if own == 0 or len(cells) <= k + 1:
            continue
        neighbours = NearestNeighbors(n_neighbors=k).fit(embedding[cells]).kneighbors(return_distance=False)  # not self
        counts = np.stack([(codes[cells][neighbours] == b).sum(1) for b in range(n_batches)], axis=1)
        scores.append(entropy(counts.astype(float)) / own)
    return float(np.concatenate(scores).mean()) if scores else float("nan")


def transfer_f1(embedding: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> float:
    """Macro-F1 of kNN labels (k=15) carried from the largest batch's cells to the other batches'
    cells of the types that batch has (a type it lacks could not be carried: mca's batches are
    tissues, each with its own types)."""
    labels, batches = np.asarray(labels), np.asarray(batches)
    values, sizes = np.unique(batches, return_counts=True)
    reference = batches == values[sizes.argmax()]
    query = ~reference & np.isin(labels, labels[reference])
    return knn_scores(embedding, labels, np.flatnonzero(reference), np.flatnonzero(query))["macro_f1"]


def harmony(adata, pca: np.ndarray, batch_key: str) -> np.ndarray | None:
    """Harmony on the uncorrected PCA (scanpy's wrapper of harmonypy); None where harmonypy is not installed."""
    if importlib.util.find_spec("harmonypy") is None:
        print("harmonypy is not installed: Harmony left out (pip install harmonypy)")
        return None
    import anndata as ad
    import scanpy as sc

    cells = ad.AnnData(np.zeros((adata.n_obs, 0), dtype=np.float32), obs=adata.obs[[batch_key]].copy(),
                       obsm={"X_pca": pca})
    sc.external.pp.harmony_integrate(cells, batch_key, basis="X_pca", adjusted_basis="X_harmony")
    return np.asarray(cells.obsm["X_harmony"], dtype=np.float32)


def timed(method, *args, **kwargs) -> tuple:
    start = time.perf_counter()
    return method(*args, **kwargs), time.perf_counter() - start


def embeddings(adata, target: Target, args) -> tuple[dict, dict]:
    """Every method's embedding of the file, and what each row reports beside its scores
    (training seconds; the exceiver rows: steps, and whether the file was pretrained on)."""
    init, n_threads = args.init, args.threads
    reading = {"gene_key": target.gene_key} if target.gene_key else {}
    found, facts = {}, {}
    threads(n_threads)
    found[PCA_RECIPE], seconds = timed(pca_hvg2000_seurat_scaled_50, adata)
    facts[PCA_RECIPE] = {"seconds": seconds}
    corrected, seconds = timed(harmony, adata, found[PCA_RECIPE], target.batch_key)
    if corrected is not None:
        found["harmony"], facts["harmony"] = corrected, {"seconds": seconds}
    threads(n_threads)
    model, budget = scvi_baseline(adata, batch_key=target.batch_key, minutes=args.scvi_minutes)
    found["scvi"], facts["scvi"] = model.get_latent_representation(), {"seconds": budget}
    threads(n_threads)
    base = Exceiver.load(init)
    seen = any(file in base.metrics.get("datasets", {}) for file in getattr(target, "files", (target.file,)))
    found["exceiver_zero_shot"] = base.embed(adata, inplace=False, progress=False, **reading)
    facts["exceiver_zero_shot"] = {"seconds": 0.0, "steps": 0, "pretrained_on_file": seen}
    continued = pretrain(adata, None, init=init, model=dict(args.init_model), gene_key=target.gene_key,
                         batch_key=target.batch_key,
                         max_minutes=budget / 60, max_epochs=100_000, patience=100_000, seed=0, progress=False)
    found["exceiver_continued"] = continued.embed(adata, inplace=False, progress=False, **reading)
    facts["exceiver_continued"] = {"seconds": continued.metrics["seconds"], "steps": continued.metrics["steps"],
                                   "pretrained_on_file": seen}
    if args.scratch:  # the `default` preset with the --set overrides, trained on the file alone
        own = pretrain(adata, None, model=dict(args.model), gene_key=target.gene_key, batch_key=target.batch_key,
                       max_minutes=budget / 60, max_epochs=100_000, patience=100_000, seed=0, progress=False)
        found["exceiver_scratch"] = own.embed(adata, inplace=False, progress=False, **reading)
        facts["exceiver_scratch"] = {"seconds": own.metrics["seconds"], "steps": own.metrics["steps"]}
    return found, facts


def judge(adata, target: Target, args) -> dict:
    """One target's rows: each method's training time, scib scores and neighbour scores."""
    labels, batches = target.labels(adata), adata.obs[target.batch_key].astype(str).to_numpy()
    found, facts = embeddings(adata, target, args)
    scib = scib_scores(found, labels, batches, pre_integrated=PCA_RECIPE, n_jobs=args.threads or 1)
    return {method: {**facts[method], **{f"scib_{k}": v for k, v in scib[method].items()},
                     "knn_macro_f1": knn_cross_validated(emb, labels, seed=0)["knn_macro_f1"],
                     "mixing": same_type_mixing(emb, labels, batches),
                     "transfer_f1": transfer_f1(emb, labels, batches)} for method, emb in found.items()}


def describe(adata, target: Target) -> dict:
    """The cells' batch and label sizes (printed before the work, kept in the result)."""
    sizes = {key: adata.obs[key].astype(str).value_counts().to_dict() for key in (target.batch_key, target.label_key)}
    print(f"\n{target.file}: {adata.n_obs} cells; {target.batch_key}: {sizes[target.batch_key]}; "
          f"{target.label_key}: {sizes[target.label_key]}", flush=True)
    return sizes


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="results JSON (targets already in it are kept)")
    parser.add_argument("--init", default=DEFAULT_MODEL, help="the pretrained model: a folder or a shipped name")
    parser.add_argument("--max-cells", type=int, default=None, help="a seeded random subsample (quick checks)")
    parser.add_argument("--scvi-minutes", type=float, default=None,
                        help="scVI's wall time instead of its default epochs (quick checks)")
    parser.add_argument("--scratch", action="store_true",
                        help="add exceiver trained from scratch on the file with its batch key, for scVI's time")
    add_model_overrides_option(parser, "with --scratch: override a field of the default preset, as "
                                       "`exceiver pretrain --set` (repeat for several)")
    parser.add_argument("--init-set", dest="init_model", action="append", default=[], type=model_option,
                        help="the continued row: an integration setting of `pretrain(init=..., model=...)`, e.g. "
                             "--init-set bottleneck_variance=learned (repeat for several)")
    add_threads_option(parser)
    add_targets_option(parser, TARGETS)
    args = parser.parse_args()
    keys = ("init", "max_cells", "scvi_minutes", "scratch")
    data, settings = shared_folder() / "data", {key: vars(args)[key] for key in keys} | {
        "model": dict(args.model), "init_model": dict(args.init_model)}
    quiet()
    results = read_result(args.out, {})
    for name in args.targets:
        target = TARGETS[name]
        if results.get(name, {}).get("settings") != settings:
            adata = subsample(target.read(data), args.max_cells)
            sizes = describe(adata, target)
            results[name] = {"settings": settings, "file": target.file, "batch_key": target.batch_key,
                             "cells": adata.n_obs, "sizes": sizes, "methods": judge(adata, target, args)}
            write_result(results, args.out)
        print(table(results[name]))


def table(result: dict) -> str:
    """A target's markdown table, one row per method."""
    methods = result["methods"]
    seen = any(m.get("pretrained_on_file") for m in methods.values())
    lines = [f"\n{result['file']} ({result['cells']} cells, batches: {result['batch_key']}; "
             f"model {result['settings']['init']}{', pretrained on this file (labels unseen)' if seen else ''})",
             "| method | training s | scib bio | scib batch | scib total | kNN macro-F1 | mixing | transfer F1 |",
             "|---|---|---|---|---|---|---|---|"]
    for method in [m for m in METHODS if m in methods]:
        m = methods[method]
        lines.append(f"| {method} | {m['seconds']:.0f} | {m['scib_bio']:.3f} | {m['scib_batch']:.3f} | "
                     f"{m['scib_total']:.3f} | {m['knn_macro_f1']:.3f} | {m['mixing']:.3f} | {m['transfer_f1']:.3f} |")
    return "\n".join(lines + [pca_legend([PCA_RECIPE])])


if __name__ == "__main__":
    main()
