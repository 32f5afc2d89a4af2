"""Does in-silico perturbation recover known biology?

With a model pretrained on shared files that exclude kang2018, on kang2018's control PBMCs:

1. Interferon: overexpress IFN regulators (STAT1, STAT2, IRF1, IRF7, IRF9) and score how well each
   one's predicted shifts rank (AUROC) the genes that real IFN-beta stimulation induced in this
   dataset (stim vs ctrl, Wilcoxon) and the MSigDB hallmark IFN-alpha / IFN-gamma response genes.
   The baselines, run in the same pass: random regulators of matched detection rate (not IFN genes),
   and plain co-expression (each gene ranked by its Pearson correlation with the regulator over all
   control cells, log-normalised: the stronger estimate; genes detected in > 1% of the perturbed
   cells), scored on the same genes as the model: a model that learned regulation must beat it.
2. CORUM: knock out genes of protein complexes and score (AUROC) whether the predicted shifts of
   their complex partners are lower than those of the other genes; the control scores the same
   partner sets under the knockout of a random gene of matched detection rate.

    EXCEIVER_SHARED=../shared python benchmarks/perturbation_validation.py --model /tmp/transfer/pretrained
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from sklearn.metrics import roc_auc_score

from common import ANNOTATIONS, TARGETS, benchmark_parser, shared_folder, threads, write_result
from exceiver import Exceiver
from exceiver.tl import gene_dependencies, perturb, plot_dependencies

REGULATORS = ["STAT1", "STAT2", "IRF1", "IRF7", "IRF9"]
HALLMARKS = ["HALLMARK_INTERFERON_ALPHA_RESPONSE", "HALLMARK_INTERFERON_GAMMA_RESPONSE"]


def induced_genes(adata: ad.AnnData, genes: np.ndarray) -> list[str]:
    """Genes up in IFN-beta-stimulated cells (Wilcoxon adjusted p < 0.01, log2 fold change > 1),
    most significant first."""
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.tl.rank_genes_groups(norm, "condition", groups=["stim"], reference="ctrl", method="wilcoxon")
    de = sc.get.rank_genes_groups_df(norm, "stim")
    hits = de[(de["pvals_adj"] < 0.01) & (de["logfoldchanges"] > 1) & de["names"].isin(set(genes))]
    return list(hits.sort_values("scores", ascending=False)["names"])


def matched_genes(detection: pd.Series, targets: list[str], exclude: set[str], k: int, rng) -> list[list[str]]:
    """For each target, k genes (not excluded) drawn from the 100 of nearest detection rate."""
    pool = detection.drop(labels=[g for g in detection.index if g in exclude])
    picks, used = [], set()
    for gene in targets:
        nearest = (pool - detection[gene]).abs().sort_values().index
        nearest = [g for g in nearest[:100] if g not in used]
        chosen = list(rng.choice(nearest, size=k, replace=False))
        used.update(chosen)
        picks.append(chosen)
    return picks


def auroc(scores: pd.Series, positives: set[str]) -> float:
    labels = scores.index.isin(list(positives))
    return float(roc_auc_score(labels, scores.to_numpy())) if 0 < labels.sum() < len(labels) else float("nan")


def shifts(effects: pd.DataFrame, gene: str) -> pd.Series:
    """Mean predicted shift of every query gene under the perturbation of `gene` (itself left out)."""
    part = effects[effects["perturbed_gene"] == gene].set_index("gene")["mean_shift"]
    return part.drop(gene, errors="ignore")


def coexpression(ctrl: ad.AnnData, genes: list[str], regulators: list[str]) -> pd.DataFrame:
    """Pearson correlation [gene, regulator] of log-normalised expression over the cells."""
    norm = ctrl[:, genes].copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    x = norm.X.toarray() if hasattr(norm.X, "toarray") else np.asarray(norm.X)
    z = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    return pd.DataFrame(z.T @ z[:, [genes.index(r) for r in regulators]] / len(z), index=genes, columns=regulators)


def interferon(model, ctrl, ctrl_all, query, detection, positive_sets, n_random, rng, args) -> dict:
    regulators = [g for g in REGULATORS if g in detection.index and detection[g] > 0]
    exclude = set().union(*positive_sets.values()) | set(REGULATORS)
    random = matched_genes(detection, regulators, exclude, n_random, rng)
    genes = regulators + [g for group in random for g in group]
    start = time.time()
    effects = perturb(model, ctrl, genes, "overexpress", query_genes=list(query), quantile=args.quantile,
                      batch_size=args.batch_size, progress=False)
    print(f"overexpressed {len(genes)} genes in {ctrl.n_obs} control cells x {len(query)} query genes "
          f"in {time.time() - start:.0f} s")
    levels = effects.groupby("perturbed_gene")["level"].first()
    correlation = coexpression(ctrl_all, [g for g in query if detection[g] > 0.01], regulators)
    out = {"regulators": {}, "random": {}}
    for name, positives in positive_sets.items():
        reg = {g: auroc(shifts(effects, g), positives) for g in regulators}
        rand = np.array([auroc(shifts(effects, g), positives) for group in random for g in group])
        separation = roc_auc_score(np.r_[np.ones(len(reg)), np.zeros(len(rand))], np.r_[list(reg.values()), rand])
        out["regulators"][name] = reg
        out["random"][name] = rand.tolist()
        print(f"\n{name} ({len(positives)} genes among {len(query)}): enrichment AUROC of the predicted "
              f"up-shifts; random matched regulators {np.nanmean(rand):.3f} +- {np.nanstd(rand):.3f} (n={len(rand)})")
        for g, value in reg.items():
            print(f"  {g:6s} (detected in {detection[g]:.0%} of cells, set to {levels[g]:.2f}): {value:.3f}"
                  f"  (above {np.mean(rand < value):.0%} of random regulators)")
        print(f"  IFN regulators vs random regulators, AUROC of their enrichment AUROCs: {separation:.3f}")
        out.setdefault("separation", {})[name] = float(separation)
        out.setdefault("beside_coexpression", {})[name] = beside_coexpression(effects, correlation, regulators, positives)
    return out


def beside_coexpression(effects: pd.DataFrame, correlation: pd.DataFrame, regulators: list[str],
                        positives: set[str]) -> dict:
    """Each regulator's enrichment AUROC by the model's shifts and by co-expression, on the same genes
    (those detected in > 1% of the cells, the regulator left out), printed side by side."""
    rows = {}
    print(f"  on the {len(correlation) - 1} genes detected in > 1% of cells: model vs co-expression")
    for g in regulators:
        model_scores = shifts(effects, g).reindex(correlation.index.drop(g, errors="ignore")).dropna()
        rows[g] = {"model": auroc(model_scores, positives),
                   "coexpression": auroc(correlation[g].reindex(model_scores.index), positives)}
        print(f"  {g:6s} model {rows[g]['model']:.3f}  co-expression {rows[g]['coexpression']:.3f}"
              f"  ({'above' if rows[g]['model'] > rows[g]['coexpression'] else 'not above'})")
    return rows


def corum(model, ctrl, query, detection, annotations, n_genes, rng, args) -> dict:
    complexes = annotations[(annotations["source"] == "CORUM") & annotations["gene_symbol"].isin(query)]
    members = complexes.groupby("annotation_id")["gene_symbol"].apply(set)
    partners = {}
    for gene, ids in complexes.groupby("gene_symbol")["annotation_id"]:
        partners[gene] = set().union(*(members[i] for i in ids)) - {gene}
    candidates = [g for g, p in partners.items() if len(p) >= 3 and detection.get(g, 0) >= 0.3]
    chosen = list(rng.choice(sorted(candidates), size=min(n_genes, len(candidates)), replace=False))
    in_complex = set(complexes["gene_symbol"])
    controls = [group[0] for group in matched_genes(detection, chosen, in_complex, 1, rng)]
    start = time.time()
    effects = perturb(model, ctrl, chosen + controls, "knockout", query_genes=list(query),
                      batch_size=args.batch_size, progress=False)
    print(f"\nknocked out {len(chosen)} complex genes + {len(controls)} matched controls in "
          f"{time.time() - start:.0f} s ({len(candidates)} candidates: >= 3 CORUM partners, detected in >= 30%)")
    real = np.array([auroc(-shifts(effects, g), partners[g]) for g in chosen])
    control = np.array([auroc(-shifts(effects, c).drop(g, errors="ignore"), partners[g])
                        for g, c in zip(chosen, controls)])
    print(f"CORUM partners lowered more than other genes, AUROC of the predicted down-shift: "
          f"knockout {np.nanmean(real):.3f} (median {np.nanmedian(real):.3f}, > 0.5 for {np.mean(real > 0.5):.0%}) "
          f"vs matched random knockout {np.nanmean(control):.3f} (median {np.nanmedian(control):.3f}); "
          f"knockout beats its control for {np.mean(real > control):.0%} of {len(chosen)} genes")
    return {"genes": chosen, "controls": controls, "auroc": real.tolist(), "control_auroc": control.tolist()}


def dependency_figure(model, ctrl, genes: list[str], args) -> None:
    """Overexpression effects among the IFN regulators and the most induced genes, clustered."""
    deps = gene_dependencies(model, ctrl, genes, mode="overexpress", quantile=args.quantile,
                             batch_size=args.batch_size, progress=False)
    plot_dependencies(deps.effects, args.figure, title="kang2018 control cells: overexpression effect size "
                      "(row: overexpressed gene)")
    print(f"\ndependency map of {len(genes)} genes drawn to {args.figure}; strongest partners:")
    print(deps.partners(n=3).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", type=Path, default=Path("/tmp/transfer/pretrained"))
    parser.add_argument("--cells", type=int, default=400, help="control cells to perturb (sampled)")
    parser.add_argument("--random", type=int, default=6, help="random matched regulators per IFN regulator")
    parser.add_argument("--corum-genes", type=int, default=25)
    parser.add_argument("--quantile", type=float, default=0.95)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    parser.add_argument("--parts", nargs="*", default=["interferon", "corum"], choices=["interferon", "corum"])
    parser.add_argument("--figure", type=Path, help="draw the dependency map of IFN regulators and induced genes here")
    args = parser.parse_args()
    threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shared = shared_folder()
    rng = np.random.default_rng(args.seed)

    model = Exceiver.load(args.model)
    print(f"model {args.model}: {model}; zero_query_ratio {model.tokenizer.zero_query_ratio}")
    kang = TARGETS["kang"].read(shared / "data")
    ctrl_all = kang[kang.obs["condition"] == "ctrl"]
    ctrl = ctrl_all[np.sort(rng.choice(ctrl_all.n_obs, size=min(args.cells, ctrl_all.n_obs), replace=False))].copy()
    vocab_ids = model.vocab.ids(list(kang.var_names))
    trained = np.zeros(len(vocab_ids), dtype=bool)
    trained[vocab_ids >= 0] = model.scaler.trained_genes[vocab_ids[vocab_ids >= 0]]
    query = np.asarray(kang.var_names[trained])
    detection = pd.Series(np.asarray((ctrl[:, query].X > 0).mean(0)).ravel(), index=query)

    annotations = pd.read_csv(shared / ANNOTATIONS, sep="\t")
    induced = induced_genes(kang, query)
    positive_sets = {"induced by IFN-beta in kang2018": set(induced)}
    for name in HALLMARKS:
        positive_sets[name] = set(annotations.loc[annotations["annotation_id"] == name, "gene_symbol"]) & set(query)
    results = {"model": str(args.model), "cells": ctrl.n_obs, "query_genes": len(query),
               "set_sizes": {k: len(v) for k, v in positive_sets.items()}}
    if "interferon" in args.parts:
        results["interferon"] = interferon(model, ctrl, ctrl_all, query, detection, positive_sets, args.random, rng,
                                           args)
    if "corum" in args.parts:
        results["corum"] = corum(model, ctrl, query, detection, annotations, args.corum_genes, rng, args)
    if args.figure:
        regulators = [g for g in REGULATORS if detection.get(g, 0) > 0]
        dependency_figure(model, ctrl, regulators + [g for g in induced if g not in regulators][:15], args)
    if args.out:
        write_result(results, args.out)


if __name__ == "__main__":
    main()
