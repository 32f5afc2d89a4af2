"""Which recipe the next shipped model (`human-mouse-base`, docs/base_model_plan.md) trains with.

One change at a time from the `default` preset on every protein-coding gene the training files
measure (human as they are, mouse through the ortholog table): each variant is pretrained for the
same number of epochs (equal steps: a busy machine changes the time, not the result), on one thread, on the training files only (the held-out files of the plan are never
read), then judged by the cell-type kNN macro-F1 (k=15, 5-fold) of its embedding on labelled
*training* files whose labels pretraining never sees (`JUDGES`), beside its validation losses and
training cells/s. The held-out files are kept for the model card.

    EXCEIVER_SHARED=../shared python benchmarks/base_recipe.py --epochs 8 --jobs 2 \
        --variants full variable_tokens bottleneck32 --out base_recipe.json
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import warnings
from pathlib import Path

import numpy as np

from common import (BASE_HELD_OUT, ORTHOLOGS, PROTEIN_CODING_GENES, Target, benchmark_parser, read_result,
                    shared_folder, threads, write_result)

# Labelled training files: their cells are pretrained on, their labels are not.
JUDGES = [Target("joost2016_mouse_skin_epidermis_720", "cell_type", species="mouse"),
          Target("mca_mouse_stomach_intestine_scgoclust_219", "cell_type", species="mouse"),
          Target("camp2015_human_fetal_neocortex_soup_220", "cell_type"),
          Target("bastidas_ponce2019_mouse_pancreas_veloviz_739", "cell_type", species="mouse")]
# Each variant: overrides of the preset's fields (one change from "full").
VARIANTS = {
    "full": {},
    "variable_tokens": {"token_selection": "variable"},
    "rank_tokens": {"token_selection": "rank"},
    "bottleneck32": {"bottleneck_dim": 32},
    "bottleneck64": {"bottleneck_dim": 64},
    "dropout": {"dropout": 0.1},
    # The count objective on expressed genes and 256 sampled zeros, with a sampled normaliser and a
    # rank-32 output layer: 0.60x the 2,000-gene default's training cells/s instead of 0.41x.
    "cheap_counts": {"count_zero_samples": 256, "count_sampled_share": True, "count_rank": 32},
    "tokens128": {"train_tokens": 128},
    # Second round: the changes that helped alone, together.
    "rank_b32": {"token_selection": "rank", "bottleneck_dim": 32},
    "variable_b32": {"token_selection": "variable", "bottleneck_dim": 32},
    "rank_b32_dropout": {"token_selection": "rank", "bottleneck_dim": 32, "dropout": 0.1},
    "rank_b32_dropout_cheap": {"token_selection": "rank", "bottleneck_dim": 32, "dropout": 0.1,
                               "count_zero_samples": 256, "count_sampled_share": True, "count_rank": 32},
}


def training_files(shared: Path) -> list[Path]:
    return sorted(p for p in (shared / "data").glob("*.h5ad") if p.stem not in BASE_HELD_OUT)


def run_variant(job: tuple[str, int, int, Path]) -> dict:
    """Pretrain one variant (name, epochs, seed, shared folder) and judge its embedding; in its
    own process, one thread."""
    name, epochs, seed, shared = job
    import anndata as ad

    from exceiver import pretrain
    from exceiver.evaluate.cells import knn_cross_validated
    from exceiver.inference import cell_embedding

    threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    start = time.time()
    model = pretrain(training_files(shared), None, model=VARIANTS[name], genes=shared / PROTEIN_CODING_GENES,
                     n_top_genes=0, gene_key="gene_symbol", gene_map=shared / ORTHOLOGS, max_epochs=epochs,
                     patience=100_000, seed=seed, progress=False)
    m = model.metrics
    judged = {}
    for target in JUDGES:
        adata = ad.read_h5ad(target.path(shared / "data"))
        cells = model.read(adata, empty="drop", name=target.file)  # mouse cells through the model's own pairs
        embedding = cell_embedding(model, cells, progress=False)
        judged[target.file] = knn_cross_validated(embedding, target.labels(cells.adata), seed=seed)["knn_macro_f1"]
    return {"variant": name, "overrides": VARIANTS[name], "n_genes": m["n_genes"], "steps": m["steps"],
            "train_cells_per_s": m["steps"] * model.training["batch_size"] / m["seconds"],
            "val_mse_ratio": m["val_mse_ratio"], "val_counts": m.get("val_counts"), "best_step": m.get("best_step"),
            "knn_macro_f1": judged, "mean_knn_macro_f1": float(np.mean(list(judged.values()))),
            "seconds": round(time.time() - start)}


def table(rows: list[dict]) -> str:
    judges = [t.file.split("_")[0] for t in JUDGES]
    lines = ["| variant | genes | steps | cells/s | val MSE ratio | val counts | " + " | ".join(judges) + " | mean |",
             "|---|---|---|---|---|---|" + "---|" * (len(judges) + 1)]
    for r in rows:
        scores = " | ".join(f"{r['knn_macro_f1'][t.file]:.3f}" for t in JUDGES)
        lines.append(f"| {r['variant']} | {r['n_genes']:,} | {r['steps']:,} | {r['train_cells_per_s']:.0f} | "
                     f"{r['val_mse_ratio']:.3f} | {r['val_counts']:.4f} | {scores} | {r['mean_knn_macro_f1']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=8, help="training epochs per variant")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at once (one thread each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="results JSON (variants already in it are kept)")
    args = parser.parse_args()
    shared = shared_folder()
    done = {r["variant"]: r for r in read_result(args.out, [])}
    todo = [v for v in args.variants if v not in done]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for row in pool.imap_unordered(run_variant, [(v, args.epochs, args.seed, shared) for v in todo]):
            done[row["variant"]] = row
            write_result(list(done.values()), args.out)
    print(f"{args.epochs} training epochs per variant, one thread each, seed {args.seed}; kNN macro-F1 "
          "(k=15, 5-fold) of each variant's embedding on labelled training files (labels unseen):")
    print(table([done[v] for v in args.variants]))


if __name__ == "__main__":
    main()
