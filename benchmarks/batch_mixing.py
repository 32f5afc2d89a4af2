"""Batch covariates: scVI with its batch key against exceiver's `pretrain --batch-key`, on the same
file, for the same wall time, with the same threads, in the same run; PCA (the efficiency
benchmark's recipe, `pca_hvg2000_seurat_scaled_50`) and exceiver without a batch key beside them.

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

from pathlib import Path

import numpy as np

from common import (TARGETS as SHARED_TARGETS, add_model_overrides_option, add_targets_option, add_threads_option,
                    benchmark_parser, pca_hvg2000_seurat_scaled_50, pca_legend, quiet, read_result, scvi_baseline,
                    shared_folder, threads, write_result)
from exceiver import pretrain
from exceiver.evaluate.cells import batch_scores, knn_cross_validated

TARGETS = {"cellbench": SHARED_TARGETS["cellbench"]}
PCA_RECIPE = "pca_hvg2000_seurat_scaled_50"  # the efficiency benchmark's


def judge(embedding: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> dict:
    return {**knn_cross_validated(embedding, labels), **batch_scores(embedding, batches)}


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True)
    add_threads_option(parser)
    add_targets_option(parser, TARGETS)
    add_model_overrides_option(parser, "FIELD=VALUE override for an extra variant with the batch key (repeatable)")
    parser.add_argument("--variant", help="name of that extra variant")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = shared_folder() / "data"
    quiet()
    for name in args.targets:
        target = TARGETS[name]
        path = args.out / f"{name}.json"
        result = read_result(path, {"target": name, "batch_key": target.batch_key})
        adata = target.read(data)
        labels, batches = target.labels(adata), adata.obs[target.batch_key].astype(str).to_numpy()
        if "pca" not in result:
            result["pca"] = {"recipe": PCA_RECIPE, **judge(pca_hvg2000_seurat_scaled_50(adata), labels, batches)}
        if "scvi_batch" not in result:
            threads(args.threads)
            model, seconds = scvi_baseline(adata, batch_key=target.batch_key)
            result["scvi_batch"] = {"seconds": seconds, **judge(model.get_latent_representation(), labels, batches)}
            result["budget_minutes"] = seconds / 60
            write_result(result, path)
        variants = [("exceiver_batch", target.batch_key, {}), ("exceiver", None, {})]
        if args.variant:
            variants.append((f"exceiver_batch_{args.variant}", target.batch_key, dict(args.model)))
        for variant, key, settings in variants:
            if variant in result:
                continue
            threads(args.threads)
            model = pretrain(adata, None, gene_key=target.gene_key, batch_key=key, model=settings,
                             max_minutes=result["budget_minutes"], max_epochs=100_000, patience=100_000, progress=False)
            embedding = model.embed(adata, inplace=False, progress=False)
            result[variant] = {"steps": model.metrics["steps"], **judge(embedding, labels, batches)}
            write_result(result, path)
        table(result)


def table(result: dict) -> None:
    print(f"\n{result['target']} ({result['batch_key']}), {result['budget_minutes']:.1f} min each "
          f"(scVI's default training time)")
    print(f"{'method':<30}{'kNN macro-F1':>14}{'batch entropy':>15}{'1-|batch ASW|':>15}")
    recipe = result["pca"].get("recipe", PCA_RECIPE)  # results written before they recorded it: this one
    for method in ["pca", "scvi_batch", "exceiver", "exceiver_batch",
                   *sorted(k for k in result if k.startswith("exceiver_batch_"))]:
        if method in result:
            m = result[method]
            print(f"{recipe if method == 'pca' else method:<30}{m['knn_macro_f1']:14.3f}{m['batch_entropy']:15.3f}"
                  f"{m['batch_asw']:15.3f}")
    if "exceiver_batch" in result:
        e, s = result["exceiver_batch"], result["scvi_batch"]
        print(f"exceiver/scVI: kNN {e['knn_macro_f1'] / s['knn_macro_f1']:.3f}x, "
              f"batch entropy {e['batch_entropy'] / s['batch_entropy']:.3f}x")
    print(pca_legend([recipe]))


if __name__ == "__main__":
    main()
