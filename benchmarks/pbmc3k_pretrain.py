"""Pretrain on pbmc3k and judge the model two ways, against baselines measured in the same run:
masked-expression MSE vs the gene-mean baseline, and held-out cell-type kNN (k=15) of the
embedding vs PCA of log-normalised highly variable genes on the same split.

    EXCEIVER_SHARED=../shared python benchmarks/pbmc3k_pretrain.py --minutes 10
    python benchmarks/pbmc3k_pretrain.py --minutes 5 --model '{"gene_dim": 64, "latent_dim": 128}'
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
from sklearn.model_selection import train_test_split

from exceiver import pretrain
from exceiver.evaluate import knn_scores, pca_embedding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(os.environ.get("EXCEIVER_SHARED", "../shared"))
    parser.add_argument("--data", type=Path, default=shared / "data" / "pbmc3k_seurat_2638.h5ad")
    parser.add_argument("--label-key", default="cell_type")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--model", type=json.loads, default={}, help="JSON overrides of the preset")
    parser.add_argument("--training", type=json.loads, default={}, help="JSON TrainingConfig overrides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="model folder (default: keep in memory)")
    args = parser.parse_args()

    adata = ad.read_h5ad(args.data)
    labels = adata.obs[args.label_key].astype(str).to_numpy()
    train, test = train_test_split(np.arange(adata.n_obs), test_size=0.2, random_state=args.seed, stratify=labels)
    train.sort()
    model = pretrain(adata[train].copy(), args.out, preset=args.preset, model=args.model,
                     max_minutes=args.minutes, seed=args.seed, progress=False, **args.training)
    start = time.perf_counter()
    embedding = model.embed(adata, progress=False)
    embed_seconds = time.perf_counter() - start
    pca = pca_embedding(adata, fit_cells=train, n_hvg=2000, n_comps=50, seed=args.seed)
    scores = {"exceiver": knn_scores(embedding, labels, train, test), "pca_hvg2000_50": knn_scores(pca, labels, train, test)}
    m = model.metrics
    print(f"model: {model}")
    print(f"pretrained {m['seconds']:.0f} s, {m['epochs']} epochs, {m['steps']} steps ({m['stopped_by']})")
    print(f"val masked MSE {m['val_masked_mse']:.4f} | gene-mean baseline {m['val_gene_mean_mse']:.4f} | "
          f"ratio {m['val_mse_ratio']:.3f} | Pearson r {m['val_pearson']:.3f}")
    print(f"embedding {adata.n_obs} cells: {adata.n_obs / embed_seconds:.0f} cells/s")
    for name, s in scores.items():
        print(f"kNN k=15 on {len(test)} held-out cells, {name:>15}: accuracy {s['accuracy']:.3f}  macro-F1 {s['macro_f1']:.3f}")
    print(f"accuracy ratio exceiver / PCA: {scores['exceiver']['accuracy'] / scores['pca_hvg2000_50']['accuracy']:.3f}")
    print("JSON", json.dumps({"model": args.model, "preset": args.preset, "minutes": args.minutes,
                              "metrics": m, "knn": scores, "embed_cells_per_s": adata.n_obs / embed_seconds}))


if __name__ == "__main__":
    main()
