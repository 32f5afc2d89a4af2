"""What the benchmarks share: the shared datasets they measure on (targets and pretraining
corpora), the baselines a model must beat (named PCA recipes, scVI's recipe), thread pinning,
result files and the command-line options several scripts repeat.

One place for each, so that a number in two studies means the same thing: a PCA column is one
named recipe (`pca_recipe_label` says which), a target is the same file and columns everywhere.
The scripts run from this folder (`python benchmarks/NAME.py`), which puts it first on sys.path.
The numerical libraries are imported by the functions that use them: scale_memory.py measures
the peak memory of processes that import this module.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from exceiver.cli_parser import model_option
from exceiver.errors import ExceiverInputError
from exceiver.outputs import atomic_file

if TYPE_CHECKING:
    import anndata as ad
    import scvi

# Files of the shared folder besides data/ (see its README).
ORTHOLOGS = Path("genes") / "human_mouse_orthologs_ensembl105.csv"
PROTEIN_CODING_GENES = Path("genes") / "protein_coding_genes_hgnc.txt"
ANNOTATIONS = Path("annotations") / "gene_annotations.tsv.gz"


def shared_folder() -> Path:
    """The shared folder of data and annotations: EXCEIVER_SHARED, else ../shared (the README's
    commands run from the checkout, beside it)."""
    return Path(os.environ.get("EXCEIVER_SHARED", "../shared"))


@dataclass(frozen=True)
class Target:
    """A shared dataset as the benchmarks judge it.

    file: the file's name in shared/data without `.h5ad`; label_key: the obs column a
    representation should separate (cell type, cell line, condition); batch_key: the obs column
    of technical batches it should mix, if any; gene_key: the var column of gene symbols where
    var_names are other identifiers (what a model that knows genes by symbol reads); species: of
    the cells (a human model reads mouse cells through the ortholog table).
    """

    file: str
    label_key: str
    batch_key: str | None = None
    gene_key: str | None = None
    species: str = "human"

    def path(self, data: Path) -> Path:
        return data / f"{self.file}.h5ad"

    def read(self, data: Path) -> ad.AnnData:
        import anndata as ad

        path = self.path(data)
        if not path.is_file():
            raise ExceiverInputError(f"{path} not found: set EXCEIVER_SHARED to the shared folder")
        return ad.read_h5ad(path)

    def labels(self, adata: ad.AnnData) -> np.ndarray:
        return adata.obs[self.label_key].astype(str).to_numpy()


TARGETS = {
    "pbmc3k": Target("pbmc3k_seurat_2638", "cell_type"),
    "cellbench": Target("cellbench_lung_celllines_1408", "cell_type", batch_key="assay", gene_key="gene_symbol"),
    "zeisel": Target("gpsfish_zeisel_mouse_cortex_550", "cell_type", species="mouse"),
    "joost": Target("joost2016_mouse_skin_epidermis_720", "cell_type", species="mouse"),
    "kang": Target("kang2018_ifnb_harmony_2000", "condition"),  # IFN-beta stimulated or not
}
# The label-transfer tasks (label_transfer.py, finetune_lr.py, transfer_study.py).
LABEL_TASKS = {"pbmc3k_cell_type": TARGETS["pbmc3k"], "cellbench_cell_line": TARGETS["cellbench"],
               "kang_condition": TARGETS["kang"]}

# Pretraining corpora: files none of the targets is in (pbmc_small is a subset of pbmc3k: left out).
HUMAN_CORPUS = [
    "pisces_pbmc_1000", "scwg_1k_PBMC_v2_raw", "scwg_1k_PBMC_v3_filt", "scwg_5prime_PBMC_filt_1kcells",
    "streak_malt_lymphoma_10x_2100", "celltypist_sample_559", "card_pdac_1926_7kgenes", "copykat_breast_tumor_302",
    "numbat_anaplastic_thyroid_carcinoma_173", "camp2015_human_fetal_neocortex_soup_220",
    "janesick2023_breast_cancer_flex_scllm_100", "cellxgene_fetal_telencephalon_culture_hvg2000_4474",
    "pollen2014_cortex_fluidigm_65",
]
MOUSE_CORPUS = [
    "adam2017_mouse_kidney_loopofhenle_479", "bastidas_ponce2019_mouse_pancreas_veloviz_739",
    "grun2016_mouse_intestine_raceid_430", "mca_mouse_stomach_intestine_scgoclust_219", "scde_mouse_esc_mef_40",
    "ziegenhain2017_mouse_esc_protocols_262", "zilionis2019_mouse_lung_immune_800",
]


# Held out of the next shipped model (docs/base_model_plan.md): never in its training or choices.
BASE_HELD_OUT = {"pbmc3k_seurat_2638", "pbmc_small_seuratobject_80", "gpsfish_zeisel_mouse_cortex_550",
                 "card_pdac_1926_7kgenes"}


def reference_cells(task: str, adata: ad.AnnData, seed: int) -> np.ndarray:
    """The labelled reference of a label-transfer task (the other cells are the query): for
    cellbench the CEL-seq2 cells (the query is Drop-seq: a change of technology), else a random
    10% of the cells.

    Parameters
    ----------
    task
        A key of LABEL_TASKS.
    adata
        The task's cells (only obs and their number are read).
    seed
        Of the random 10% (cellbench's reference does not depend on it).

    Returns
    -------
    Boolean mask of the reference cells.
    """
    if task == "cellbench_cell_line":
        return (adata.obs[LABEL_TASKS[task].batch_key] == "CEL-seq2").to_numpy()
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[np.random.default_rng(seed).choice(adata.n_obs, round(0.1 * adata.n_obs), replace=False)] = True
    return mask


# PCA baselines. Every recipe starts from log-normalised counts (1e4 per cell, log1p; the library's
# `log_normalised`); HVG: scanpy's `seurat` flavour on those values.
N_HVG = 2000


def pca_label(n_comps: int, genes: str, scaled: bool) -> str:
    """The column header of a PCA recipe, e.g. `PCA (50 comps, 2,000 HVG seurat, unscaled)`; scaled:
    each gene to unit variance, values clipped at 10."""
    return f"PCA ({n_comps} comps, {genes}, {'scaled, clipped at 10' if scaled else 'unscaled'})"


def _hvg_log_normalised(adata: ad.AnnData, fit_cells: np.ndarray | None = None) -> ad.AnnData:
    """Log-normalised counts of the N_HVG most variable genes (chosen on `fit_cells`), sparse;
    every gene where the dataset has no more."""
    import scanpy as sc

    from exceiver.evaluate.baselines import log_normalised

    logn = log_normalised(adata)
    if logn.n_vars > N_HVG:
        fit = logn if fit_cells is None else logn[fit_cells].copy()
        hvg = sc.pp.highly_variable_genes(fit, n_top_genes=N_HVG, flavor="seurat", inplace=False)
        logn = logn[:, hvg["highly_variable"].to_numpy()].copy()
    return logn


def _n_comps(n_cells: int, n_genes: int, wanted: int = 50) -> int:
    return min(wanted, n_cells - 1, n_genes - 1)  # what ARPACK can return


def pca_hvg2000_seurat_scaled_50(adata: ad.AnnData, *, seed: int = 0) -> np.ndarray:
    """scanpy's tutorial PCA: 50 components of the 2,000 HVGs scaled to unit variance (clipped at
    10). Scaling centres, so the HVG columns are dense (cells x 2,000, never x all genes).

    Parameters
    ----------
    adata
        Raw counts in X.
    seed
        ARPACK's start vector.

    Returns
    -------
    float32 array, cells x min(50, cells - 1, genes - 1).
    """
    import scanpy as sc

    logn = _hvg_log_normalised(adata)
    sc.pp.scale(logn, max_value=10)
    n = _n_comps(logn.n_obs, logn.n_vars)
    return np.asarray(sc.pp.pca(logn, n_comps=n, random_state=seed, copy=True).obsm["X_pca"], dtype=np.float32)


def pca_hvg2000_seurat_50(adata: ad.AnnData, *, fit_cells: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """50 components of the 2,000 HVGs as they are (not scaled), sparse throughout (ARPACK,
    centred implicitly). Genes and components are chosen on `fit_cells` (default: all), then
    every cell is projected, so held-out cells stay unseen.

    Parameters
    ----------
    adata
        Raw counts in X.
    fit_cells
        Indices or a boolean mask of the cells that choose genes and components.
    seed
        ARPACK's start vector.

    Returns
    -------
    float32 array, cells x min(50, fit cells - 1, genes - 1).
    """
    from sklearn.decomposition import PCA

    logn = _hvg_log_normalised(adata, fit_cells)
    fit = logn.X if fit_cells is None else logn.X[np.asarray(fit_cells)]
    pca = PCA(n_components=_n_comps(fit.shape[0], logn.n_vars), svd_solver="arpack", random_state=seed).fit(fit)
    return pca.transform(logn.X).astype(np.float32)


# The recipes the benchmarks compute, by the key their tables print.
PCA_RECIPES = {"pca_hvg2000_seurat_scaled_50": pca_hvg2000_seurat_scaled_50,
               "pca_hvg2000_seurat_50": pca_hvg2000_seurat_50}
PCA_LABELS = {"pca_hvg2000_seurat_scaled_50": pca_label(50, "2,000 HVG seurat", scaled=True),
              "pca_hvg2000_seurat_50": pca_label(50, "2,000 HVG seurat", scaled=False)}


def pca_recipe_label(key: str) -> str:
    """What a PCA recipe key means: one of PCA_RECIPES, or of exceiver.evaluate's (`cell_baselines`,
    which the embedding study reports; their HVGs are chosen among the expressed genes)."""
    if key in PCA_LABELS:
        return PCA_LABELS[key]
    from exceiver.evaluate.baselines import PCA_RECIPES as EVALUATE_RECIPES

    if key not in EVALUATE_RECIPES:
        raise ExceiverInputError(f"{key!r} is no PCA recipe; known: {sorted(PCA_LABELS) + sorted(EVALUATE_RECIPES)}")
    n_hvg, n_comps = EVALUATE_RECIPES[key]
    return pca_label(n_comps, f"{n_hvg:,} HVG seurat of expressed genes" if n_hvg else "all expressed genes",
                     scaled=False)


def pca_legend(keys: Iterable[str]) -> str:
    """The caption of a table's PCA columns: each recipe key with what it is."""
    return "\n".join(f"{key}: {pca_recipe_label(key)} of log-normalised counts" for key in keys)


def seurat_v3_genes(counts: ad.AnnData, batch_key: str | None) -> None:
    """Keep the N_HVG seurat_v3 genes of raw counts (per batch with a batch key), in place. Where
    a batch is too small for its loess fit of variance on mean at scanpy's span (0.3 of the cells:
    "near singularities"), the fit spans all of them (span 1.0), said in a line.
    """
    import scanpy as sc

    try:
        sc.pp.highly_variable_genes(counts, flavor="seurat_v3", n_top_genes=N_HVG, batch_key=batch_key, subset=True)
    except ValueError as err:  # skmisc's loess
        print(f"seurat_v3 genes: the loess fit at span 0.3 failed ({err}); refitted at span 1.0", flush=True)
        sc.pp.highly_variable_genes(counts, flavor="seurat_v3", n_top_genes=N_HVG, batch_key=batch_key, subset=True,
                                    span=1.0)


def scvi_baseline(adata: ad.AnnData, *, batch_key: str | None = None,
                  minutes: float | None = None) -> tuple[scvi.model.SCVI, float]:
    """scVI as its tutorial trains it: raw counts of the 2,000 seurat_v3 HVGs (chosen per batch
    with a batch key, which the model then conditions on; `seurat_v3_genes`), the default model,
    default epochs or `minutes` of wall time; seed 0.

    Parameters
    ----------
    adata
        Raw counts in X.
    batch_key
        obs column of the batches, or None.
    minutes
        Wall-time budget instead of scVI's default number of epochs.

    Returns
    -------
    The trained `scvi.model.SCVI` and its training time in seconds.
    """
    import anndata as ad
    import scvi  # the [bench] extra

    scvi.settings.seed = 0
    counts = ad.AnnData(adata.X.astype(np.float32), obs=adata.obs[[batch_key] if batch_key else []].copy(),
                        var=adata.var[[]].copy())
    counts = counts[:, np.asarray((counts.X > 0).sum(0)).ravel() > 0].copy()
    seurat_v3_genes(counts, batch_key)
    scvi.model.SCVI.setup_anndata(counts, batch_key=batch_key)
    model = scvi.model.SCVI(counts)
    budget = {"max_time": {"seconds": minutes * 60}, "max_epochs": 100_000} if minutes else {}
    start = time.perf_counter()
    model.train(accelerator="cpu", enable_progress_bar=False, **budget)
    return model, time.perf_counter() - start


def labelled_subset(labels, fraction: float, seed: int, floor: int = 3) -> np.ndarray:
    """A stratified `fraction` of the cells, at least `floor` per class (seeded)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _, idx in labels.groupby(labels, observed=True).indices.items():
        n = min(len(idx), max(floor, round(fraction * len(idx))))
        rows.append(rng.choice(idx, n, replace=False))
    return np.sort(np.concatenate(rows))


def log_normalised_symbols(adata: ad.AnnData, gene_key: str | None = None) -> ad.AnnData:
    """A copy of raw counts normalised to 10,000 per cell and log1p'd, genes named by `gene_key`."""
    import scanpy as sc

    adata = adata.copy()
    if gene_key:
        adata.var_names = adata.var[gene_key].astype(str)
        adata.var_names_make_unique()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def fit_logreg_hvg(train: ad.AnnData, key: str, gene_key: str | None, seed: int):
    """Logistic regression on log-normalised counts of 2,000 HVGs selected on the training cells
    (`log_normalised_symbols`): the fitted classifier and its genes."""
    import scanpy as sc
    from sklearn.linear_model import LogisticRegression

    tr = log_normalised_symbols(train, gene_key)
    hvg = sc.pp.highly_variable_genes(tr, n_top_genes=min(2000, tr.n_vars), inplace=False, flavor="seurat")
    genes = tr.var_names[hvg["highly_variable"].to_numpy()]
    clf = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    return clf.fit(tr[:, genes].X, tr.obs[key].astype(str)), genes


def logreg_hvg(train: ad.AnnData, test: ad.AnnData, key: str, gene_key: str | None, seed: int) -> np.ndarray:
    """Logistic regression on log-normalised counts of 2,000 HVGs (selected on the training cells):
    the label baseline a model must beat."""
    clf, genes = fit_logreg_hvg(train, key, gene_key, seed)
    return clf.predict(log_normalised_symbols(test, gene_key)[:, genes].X)


def threads(n: int | None) -> None:
    """Pin torch, and OMP_NUM_THREADS (what `pretrain` sizes its threads by), to `n` threads so
    that methods compared in one run get the same. Call it again after scanpy or scVI: their
    numerical libraries reset torch's count.

    Parameters
    ----------
    n
        Threads; None (or 0) leaves torch's default.
    """
    if n:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(n)
        torch.set_num_threads(n)


def quiet() -> None:
    """Silence Lightning's and the libraries' chatter in a benchmark's output."""
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def write_result(result: dict | list, path: Path) -> None:
    """Write a result file atomically (a run killed mid-write leaves the previous one), replacing
    an earlier result (a JSON file) but never another file.

    Parameters
    ----------
    result
        What json can write.
    path
        The result file; an existing file that is not JSON is refused (ExceiverInputError).
    """
    from exceiver.io import write_json

    with atomic_file(path, overwrite=True, recognise=_is_json) as staged:
        write_json(result, staged)


def read_result(path: Path, empty: dict | list) -> dict | list:
    """An earlier run's result file, or `empty` where there is none (a rerun resumes)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else empty


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a benchmark script: its docstring (commands and all) as the help."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_targets_option(parser: argparse.ArgumentParser, names: Iterable[str], flag: str = "--targets") -> None:
    """`flag NAME ...`: which of a script's targets (or tasks) to run, all by default."""
    names = list(names)
    parser.add_argument(flag, nargs="+", choices=names, default=names, help="default: all of them")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """`--threads N` for `threads()`."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every method of the run (default: torch's)")


def add_model_overrides_option(parser: argparse.ArgumentParser, help: str) -> None:
    """`--set FIELD=VALUE` (repeatable) into `args.model`: overrides of the preset, as `exceiver pretrain --set`."""
    parser.add_argument("--set", dest="model", action="append", default=[], type=model_option, help=help)
