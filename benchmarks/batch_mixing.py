"""Batch covariates: scVI with its batch key against exceiver's `pretrain --batch-key`, on the same
file, for the same wall time, with the same threads, in the same run; PCA and exceiver without a
batch key beside them.

cellbench (lung cancer cell lines measured by CEL-seq2 and by Drop-seq) is the target: cell lines
should separate, the two technologies should mix. scVI (scvi-tools' recipe with a batch: the
2,000 seurat_v3 genes chosen per batch, `setup_anndata(batch_key=...)`, default epochs) trains
first and is timed; exceiver's `default` preset then gets that time, with and without the batch
key. Each embedding is judged by kNN macro-F1 of the cell line (k=15, 5-fold) and batch mixing:
the normalised entropy of batches among each cell's 15 neighbours (1: as mixed as the batch
sizes allow) and 1 - |batch silhouette|.

    pip install -c benchmarks/constraints.txt -e ".[bench]"
    EXCEIVER_SHARED=../shared python benchmarks/batch_mixing.py --out batch_mixing --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc

from efficiency import _threads, _write, pca  # the same recipes as the efficiency benchmark
from exceiver import pretrain
from exceiver.cli_parser import model_option
from exceiver.evaluate.cells import batch_scores, knn_cross_validated

TARGETS = {"cellbench": ("cellbench_lung_celllines_1408", "cell_type", "assay", "gene_symbol")}


def scvi_with_batches(adata: ad.AnnData, batch_key: str) -> tuple[np.ndarray, float]:
    import scvi  # the [bench] extra

    scvi.settings.seed = 0
    counts = ad.AnnData(adata.X.astype(np.float32), obs=adata.obs[[batch_key]].copy(), var=adata.var[[]].copy())
    counts = counts[:, np.asarray((counts.X > 0).sum(0)).ravel() > 0].copy()
    sc.pp.highly_variable_genes(counts, flavor="seurat_v3", n_top_genes=2000, batch_key=batch_key, subset=True)
    scvi.model.SCVI.setup_anndata(counts, batch_key=batch_key)
    model = scvi.model.SCVI(counts)
    start = time.perf_counter()
    model.train(accelerator="cpu", enable_progress_bar=False)
    return model.get_latent_representation(), time.perf_counter() - start


def judge(embedding: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> dict:
    return {**knn_cross_validated(embedding, labels), **batch_scores(embedding, batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--set", dest="model", action="append", default=[], type=model_option,
                        help="FIELD=VALUE override for an extra variant with the batch key (repeatable)")
    parser.add_argument("--variant", help="name of that extra variant")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = Path(os.environ.get("EXCEIVER_SHARED", "../shared")) / "data"
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    for name in args.targets:
        file, label_key, batch_key, gene_key = TARGETS[name]
        path = args.out / f"{name}.json"
        result = json.loads(path.read_text()) if path.exists() else {"target": name, "batch_key": batch_key}
        adata = ad.read_h5ad(data / f"{file}.h5ad")
        labels, batches = (adata.obs[k].astype(str).to_numpy() for k in (label_key, batch_key))
        if "pca" not in result:
            result["pca"] = judge(pca(adata)[0], labels, batches)
        if "scvi_batch" not in result:
            _threads(args.threads)
            embedding, seconds = scvi_with_batches(adata, batch_key)
            result["scvi_batch"] = {"seconds": seconds, **judge(embedding, labels, batches)}
            result["budget_minutes"] = seconds / 60
            _write(path, result)
        variants = [("exceiver_batch", batch_key, {}), ("exceiver", None, {})]
        if args.variant:
            variants.append((f"exceiver_batch_{args.variant}", batch_key, dict(args.model)))
        for variant, key, settings in variants:
            if variant in result:
                continue
            _threads(args.threads)
            model = pretrain(adata, None, gene_key=gene_key, batch_key=key, model=settings,
                             max_minutes=result["budget_minutes"], max_epochs=100_000, patience=100_000, progress=False)
            embedding = model.embed(adata, inplace=False, progress=False)
            result[variant] = {"steps": model.metrics["steps"], **judge(embedding, labels, batches)}
            _write(path, result)
        table(result)


def table(result: dict) -> None:
    print(f"\n{result['target']} ({result['batch_key']}), {result['budget_minutes']:.1f} min each "
          f"(scVI's default training time)")
    print(f"{'method':<28}{'kNN macro-F1':>14}{'batch entropy':>15}{'1-|batch ASW|':>15}")
    for method in ["pca", "scvi_batch", "exceiver", "exceiver_batch",
                   *sorted(k for k in result if k.startswith("exceiver_batch_"))]:
        if method in result:
            m = result[method]
            print(f"{method:<28}{m['knn_macro_f1']:14.3f}{m['batch_entropy']:15.3f}{m['batch_asw']:15.3f}")
    if "exceiver_batch" in result:
        e, s = result["exceiver_batch"], result["scvi_batch"]
        print(f"exceiver/scVI: kNN {e['knn_macro_f1'] / s['knn_macro_f1']:.3f}x, "
              f"batch entropy {e['batch_entropy'] / s['batch_entropy']:.3f}x")


if __name__ == "__main__":
    main()
