"""Pretrain on pbmc3k and judge the model two ways, against baselines measured in the same run:
masked-expression MSE vs the gene-mean baseline, and held-out cell-type kNN (k=15) of the
embedding vs PCA on the same split (`pca_hvg2000_seurat_50`: 50 components of the 2,000
log-normalised highly variable genes, unscaled, chosen on the training cells).

    EXCEIVER_SHARED=../shared python benchmarks/pbmc3k_pretrain.py --minutes 10
    python benchmarks/pbmc3k_pretrain.py --minutes 5 --model '{"gene_dim": 64, "latent_dim": 128}'
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
from sklearn.model_selection import train_test_split

from common import TARGETS, benchmark_parser, pca_hvg2000_seurat_50, pca_legend, shared_folder
from exceiver import pretrain
from exceiver.evaluate import knn_scores

PCA_RECIPE = "pca_hvg2000_seurat_50"


def main() -> None:
    parser = benchmark_parser(__doc__)
    pbmc3k = TARGETS["pbmc3k"]
    parser.add_argument("--data", type=Path, default=pbmc3k.path(shared_folder() / "data"))
    parser.add_argument("--label-key", default=pbmc3k.label_key)
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
    pca = pca_hvg2000_seurat_50(adata, fit_cells=train, seed=args.seed)  # genes and components of the training cells
    scores = {"exceiver": knn_scores(embedding, labels, train, test), PCA_RECIPE: knn_scores(pca, labels, train, test)}
    m = model.metrics
    print(f"model: {model}")
    print(f"pretrained {m['seconds']:.0f} s, {m['epochs']} epochs, {m['steps']} steps ({m['stopped_by']})")
    print(f"val masked MSE {m['val_masked_mse']:.4f} | gene-mean baseline {m['val_gene_mean_mse']:.4f} | "
          f"ratio {m['val_mse_ratio']:.3f} | Pearson r {m['val_pearson']:.3f}")
    print(f"embedding {adata.n_obs} cells: {adata.n_obs / embed_seconds:.0f} cells/s")
    for name, s in scores.items():
        print(f"kNN k=15 on {len(test)} held-out cells, {name:>21}: accuracy {s['accuracy']:.3f}  "
              f"macro-F1 {s['macro_f1']:.3f}")
    print(pca_legend([PCA_RECIPE]))
    print(f"accuracy ratio exceiver / PCA: {scores['exceiver']['accuracy'] / scores[PCA_RECIPE]['accuracy']:.3f}")
    print("JSON", json.dumps({"model": args.model, "preset": args.preset, "minutes": args.minutes,
                              "metrics": m, "knn": scores, "embed_cells_per_s": adata.n_obs / embed_seconds}))


if __name__ == "__main__":
    main()
