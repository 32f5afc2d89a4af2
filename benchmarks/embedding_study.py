"""Embedding study: do zero-shot cell embeddings capture identity, and which preset is best?

One pretraining corpus of shared files that excludes every evaluated file (and kang2018, kept unseen
for perturbation checks): human files, plus mouse files translated to human symbols through the
Ensembl ortholog table. Each variant (a preset with overrides) is pretrained on it for the same time
budget, then `exceiver.evaluate` judges it on four labelled targets it never saw, beside PCA
baselines computed identically. Results go to OUT/<variant>/<target>/ and OUT/results.json; a rerun
skips what is done.

    EXCEIVER_SHARED=../shared python benchmarks/embedding_study.py --out embedding_study \
        --variants masked_mse detection_contrastive_w0.2 --epochs 3
    python benchmarks/embedding_study.py --out embedding_study --table   # the tables only

This is the regression check of the identity work: rerun it after changing the model or objective.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anndata as ad

from common import (ANNOTATIONS, HUMAN_CORPUS, MOUSE_CORPUS, ORTHOLOGS, PROTEIN_CODING_GENES,
                    TARGETS as SHARED_TARGETS, add_targets_option, benchmark_parser, pca_legend, read_result,
                    shared_folder, write_result)
from exceiver import Exceiver, pretrain
from exceiver.data.genemap import map_genes, read_gene_map
from exceiver.evaluate.genes import read_annotations

TARGETS = {"pbmc3k": SHARED_TARGETS["pbmc3k"], "cellbench": SHARED_TARGETS["cellbench"],
           "zeisel_cortex": SHARED_TARGETS["zeisel"], "joost_epidermis": SHARED_TARGETS["joost"]}
SOURCES = ["GO_BP", "GO_CC", "GO_MF", "MSigDB_H", "MSigDB_REACTOME", "CORUM"]
# variant: (preset, model overrides, training overrides). Every objective is spelled out, so that a
# variant means the same whatever the `default` preset is (which this study chose: see docs/evaluation.md).
MSE_ONLY = {"zero_query_ratio": 0.0, "detection_weight": 0.0, "contrastive_weight": 0.0, "count_weight": 0.0,
            "value_detach": False, "values": "zscore", "bottleneck_input": "mean"}
DETECTION = {"zero_query_ratio": 1.0, "detection_weight": 1.0}
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "masked_mse": ("default", MSE_ONLY, {}),
    "contrastive": ("default", {**MSE_ONLY, "contrastive_weight": 1.0}, {}),
    "contrastive_w0.2": ("default", {**MSE_ONLY, "contrastive_weight": 0.2}, {}),
    "zero_queries": ("default", {**MSE_ONLY, "zero_query_ratio": 1.0}, {}),
    "detection": ("default", {**MSE_ONLY, **DETECTION}, {}),
    "detection_contrastive": ("default", {**DETECTION, "contrastive_weight": 1.0}, {}),
    "detection_contrastive_w0.2": ("default", {**DETECTION, "contrastive_weight": 0.2}, {}),
    "detection_contrastive_w0.2_9epochs": ("default", {**DETECTION, "contrastive_weight": 0.2},
                                           {"max_epochs": 9, "patience": 9}),
    "detection_contrastive_w0.2_18epochs": ("default", {**DETECTION, "contrastive_weight": 0.2},
                                            {"max_epochs": 18, "patience": 18}),
    "lr3e-3": ("default", {**DETECTION, "contrastive_weight": 0.2}, {"learning_rate": 3e-3}),
    "latents64": ("default", {**DETECTION, "contrastive_weight": 0.2, "n_latents": 64}, {}),
    "mask0.5": ("default", {**DETECTION, "contrastive_weight": 0.2, "mask_fraction": 0.5}, {}),
    # The whole cell's counts through the cell bottleneck (see docs/presets.md, measurement 4).
    "counts": ("default", {**MSE_ONLY, "count_weight": 1.0}, {}),
    "counts_detached_values": ("default", {**MSE_ONLY, "count_weight": 1.0, "value_detach": True}, {}),
    "counts_log_values_flat_bottleneck": ("default", {**MSE_ONLY, "count_weight": 1.0, "value_detach": True,
                                                      "values": "log", "bottleneck_input": "flatten"}, {}),
}
# The variants cell_query, depth_tokens and rank_values of docs/evaluation.md used options that were
# retired since (a learned cell query, depth tokens, rank values): their numbers stay in the docs.


def read_target(data: Path, name: str, orthologs) -> tuple[ad.AnnData, str, str | None, str | None]:
    """A target as the human-symbol models read it: mouse cells through the ortholog table."""
    target = TARGETS[name]
    adata, gene_key = target.read(data), target.gene_key
    if target.species == "mouse":
        adata, gene_key = map_genes(adata, orthologs, name=target.file), None
    return adata, target.label_key, target.batch_key, gene_key


def corpus(data: Path, orthologs) -> list[ad.AnnData]:
    human = [ad.read_h5ad(data / f"{n}.h5ad") for n in HUMAN_CORPUS]
    mouse = []
    for n in MOUSE_CORPUS:
        adata = ad.read_h5ad(data / f"{n}.h5ad")
        gene_key = "gene_symbol" if "gene_symbol" in adata.var.columns else None
        mouse.append(map_genes(adata, orthologs, gene_key=gene_key, name=n))
    return human + mouse


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("embedding_study"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_targets_option(parser, TARGETS)
    parser.add_argument("--epochs", type=int, default=3,
                        help="pretraining epochs per variant (a budget in steps, not minutes, keeps "
                             "variants comparable when the machine is shared)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="a wall-time budget per variant instead (stops at the budget, not at --epochs)")
    parser.add_argument("--pretrain-only", action="store_true")
    parser.add_argument("--table", action="store_true", help="only print the tables of earlier runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    if args.table:
        print_tables(read_result(results_file, {}))
        return
    shared = shared_folder()
    data = shared / "data"
    orthologs = read_gene_map(shared / ORTHOLOGS)
    annotations = read_annotations(shared / ANNOTATIONS)
    results = read_result(results_file, {})
    for variant in args.variants:
        model_dir = args.out / variant / "model"
        if not (model_dir / "config.json").exists():
            preset, overrides, training = VARIANTS[variant]
            if args.minutes:
                training = {"max_minutes": args.minutes, "max_epochs": 100_000, "patience": 100_000, **training}
            start = time.time()
            pretrain(corpus(data, orthologs), model_dir, preset=preset, model=overrides,
                     genes=shared / PROTEIN_CODING_GENES,
                     **{"max_epochs": args.epochs, "patience": args.epochs, **training},
                     progress=False, overwrite=True)
            print(f"{variant}: pretrained in {time.time() - start:.0f} s", flush=True)
        model = Exceiver.load(model_dir)
        print(f"{variant}: {model}; val MSE ratio {model.metrics['val_mse_ratio']:.3f} "
              f"({model.metrics['steps']} steps)", flush=True)
        if args.pretrain_only:
            continue
        from exceiver.evaluate.cells import knn_cross_validated
        from exceiver.evaluate.report import evaluate

        for target in args.targets:
            key = f"{variant}/{target}"
            if key in results:
                continue
            adata, label_key, batch_key, gene_key = read_target(data, target, orthologs)
            start = time.time()
            metrics = evaluate(model, adata, args.out / variant / target, label_keys=[label_key],
                               batch_key=batch_key, gene_key=gene_key, annotations=annotations, sources=SOURCES,
                               overwrite=True, progress=False, name=TARGETS[target].file)
            labelled = adata.obs[label_key].notna().to_numpy()
            flat = model.embed(adata[labelled].copy(), pooling="flatten", inplace=False, gene_key=gene_key,
                               progress=False)
            metrics["flatten_pooling"] = knn_cross_validated(flat, adata.obs[label_key][labelled].astype(str).to_numpy())
            metrics["pretraining"] = {k: model.metrics[k] for k in ("val_mse_ratio", "steps", "seconds")}
            results[key] = metrics
            save(results, results_file)
            print(f"{key}: evaluated in {time.time() - start:.0f} s", flush=True)
        for target in args.targets:  # cheap, so also added to results of earlier runs
            key = f"{variant}/{target}"
            if "readouts" not in results[key]:
                results[key]["readouts"] = readouts(model, *read_target(data, target, orthologs))
                save(results, results_file)
    print_tables(results)


def save(results: dict, results_file: Path) -> None:
    """Merge into the file (other runs of this script may write to it meanwhile), atomically."""
    results.update({k: v for k, v in read_result(results_file, {}).items()
                    if k not in results or len(v) > len(results[k])})
    write_result(results, results_file)


def readouts(model: Exceiver, adata: ad.AnnData, label_key: str, batch_key, gene_key) -> dict[str, float]:
    """kNN macro-F1 of every pooling of the latents, as they are (Euclidean) and centred and
    L2-normalised (cosine), beside the PCA recipes under the same two metrics."""
    from sklearn.preprocessing import normalize

    from exceiver.evaluate.baselines import cell_baselines
    from exceiver.evaluate.cells import knn_cross_validated

    adata = adata[adata.obs[label_key].notna().to_numpy()].copy()
    labels = adata.obs[label_key].astype(str).to_numpy()
    reps = {f"exceiver_{p}": model.embed(adata, pooling=p, inplace=False, gene_key=gene_key, progress=False)
            for p in ("mean", "flatten")}
    reps |= {k: v for k, v in cell_baselines(adata).items() if k.startswith("pca")}
    scores = {}
    for name, x in reps.items():
        scores[name] = knn_cross_validated(x, labels)["knn_macro_f1"]
        scores[f"{name}_cosine"] = knn_cross_validated(normalize(x - x.mean(0)), labels)["knn_macro_f1"]
    return scores


def print_tables(results: dict) -> None:
    """Cell-identity table (kNN macro-F1 etc., Exceiver vs the best PCA recipe, by kNN macro-F1 among
    exceiver.evaluate's, named in each row and captioned) and gene AUROCs."""
    recipes = set()
    rows = ["| variant | target | masked MSE / gene mean | kNN macro-F1: Exceiver (flatten) / best PCA (recipe) | "
            "Leiden ARI | Leiden NMI | silhouette | depth R^2 |", "|---|---|---|---|---|---|---|---|"]
    for key, m in results.items():
        variant, target = key.split("/")
        for label, cell in m["cells"].items():
            reps = cell["representations"]
            ours = reps["exceiver"]
            pcas = {k: v for k, v in reps.items() if k.startswith("pca")}
            best = max(pcas, key=lambda k: pcas[k]["knn_macro_f1"])
            recipes.add(best)
            rows.append(
                f"| {variant} | {target} | {m['reconstruction']['model']['mse_ratio']:.3f} | "
                f"{ours['knn_macro_f1']:.3f} ({m['flatten_pooling']['knn_macro_f1']:.3f}) / "
                f"{pcas[best]['knn_macro_f1']:.3f} ({best}) | "
                f"{ours['leiden_ari']:.3f} / {pcas[best]['leiden_ari']:.3f} | "
                f"{ours['leiden_nmi']:.3f} / {pcas[best]['leiden_nmi']:.3f} | "
                f"{ours['silhouette']:.3f} / {pcas[best]['silhouette']:.3f} | "
                f"{m['depth_r2']['exceiver']:.2f} / {m['depth_r2'][best]:.2f} |")
    print("\n".join(rows))
    print(pca_legend(sorted(recipes)))
    print_summary(results)
    print_readouts(results)
    genes = {}
    for key, m in results.items():
        variant = key.split("/")[0]
        if m.get("genes") and variant not in genes:
            genes[variant] = m["genes"]["auroc"]
    if genes:
        sources = sorted({s for g in genes.values() for s in g})
        print("\n| variant | representation | " + " | ".join(sources) + " |")
        print("|---|---|" + "---|" * len(sources))
        for variant, auroc in genes.items():
            for rep in ("exceiver", "pca_loadings", "random"):
                print(f"| {variant} | {rep} | " + " | ".join(
                    f"{auroc[s][rep]:.3f}" if rep in auroc.get(s, {}) else "-" for s in sources) + " |")
        print("pca_loadings: each gene's loadings on 50 components of all expressed genes of the target "
              "(log-normalised, unscaled), times the components' standard deviations")


def print_summary(results: dict) -> None:
    """One row per variant: means over its evaluated targets (the summary table of docs/evaluation.md)."""
    rows: dict[str, list[dict]] = {}
    for key, m in results.items():
        rows.setdefault(key.split("/")[0], []).append(m)
    print("\n| variant (targets) | val MSE ratio | held-out MSE ratio | kNN macro-F1 (flatten) | Leiden ARI | "
          "Leiden NMI | silhouette | depth R^2 |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, ms in rows.items():
        cells = [next(iter(m["cells"].values()))["representations"]["exceiver"] for m in ms]

        def mean(values):
            return sum(values) / len(values)

        print(f"| {variant} ({len(ms)}) | {ms[0]['pretraining']['val_mse_ratio']:.3f} | "
              f"{mean([m['reconstruction']['model']['mse_ratio'] for m in ms]):.2f} | "
              f"{mean([c['knn_macro_f1'] for c in cells]):.3f} "
              f"({mean([m['flatten_pooling']['knn_macro_f1'] for m in ms]):.3f}) | "
              + " | ".join(f"{mean([c[k] for c in cells]):.3f}" for k in ("leiden_ari", "leiden_nmi", "silhouette"))
              + f" | {mean([m['depth_r2']['exceiver'] for m in ms]):.2f} |")


def print_readouts(results: dict) -> None:
    """Mean over targets of kNN macro-F1 per readout (Euclidean / centred cosine), per variant."""
    table: dict[str, dict[str, list[float]]] = {}
    for key, m in results.items():
        if "readouts" in m:
            for name, value in m["readouts"].items():
                table.setdefault(key.split("/")[0], {}).setdefault(name, []).append(value)
    if not table:
        return
    recipes = set()
    names = ["exceiver_mean", "exceiver_flatten", "best PCA recipe"]
    print("\n| variant (targets) | " + " | ".join(f"{n} (cosine)" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for variant, scores in table.items():
        mean = {k: sum(v) / len(v) for k, v in scores.items()}
        n = len(next(iter(scores.values())))
        cells = []
        for name in names:
            if name == "best PCA recipe":  # the best by each metric, each named
                pca = [k for k in mean if k.startswith("pca") and not k.endswith("_cosine")]
                best, best_cosine = max(pca, key=mean.get), max(pca, key=lambda k: mean[k + "_cosine"])
                recipes |= {best, best_cosine}
                cells.append(f"{mean[best]:.3f} {best} ({mean[best_cosine + '_cosine']:.3f} {best_cosine})")
            else:
                cells.append(f"{mean[name]:.3f} ({mean[name + '_cosine']:.3f})" if name in mean else "-")
        print(f"| {variant} ({n}) | " + " | ".join(cells) + " |")
    print(pca_legend(sorted(recipes)))


if __name__ == "__main__":
    main()
