"""Transfer study: what does pretraining buy for downstream prediction?

A pretrained model (`--base MODEL_DIR`, e.g. the embedding study's corpus model, pretrained on
shared files that are none of the targets; without one, the `default` preset is pretrained here on
human files other than the targets) is compared, for each target task, label fraction (1%, 10%,
100% of the training cells; at least 3 cells per class) and seed, on held-out cells:
  annotate_base       `exceiver annotate` with the base model as it is (zero-shot embedding);
  annotate_continued  the base continued (`pretrain --init --extend-genes`) on the task's training
                      cells, labels unseen, for --continue-minutes, then `annotate`;
  annotate_own        the `default` preset pretrained from scratch on the same cells for the same
                      minutes, then `annotate` (what the base adds to unlabelled data alone);
  probe               `finetune --freeze` of the base (a linear probe of its embedding);
  finetuned           `finetune` of the base (every weight, a class-token head);
  scratch             `finetune --from-scratch` (the same architecture, random weights);
  logreg_hvg          logistic regression on log-normalised highly variable genes.
Targets: kang2018 `condition` (IFN-beta stimulation), pbmc3k `cell_type`, cellbench lung cell line
(trained on one assay, tested on the other). Results are appended to a JSON file (a rerun resumes),
then printed as a table and drawn.

    EXCEIVER_SHARED=../shared python benchmarks/transfer_study.py --out transfer_results \
        --base ../study/counts_log_values_flat_bottleneck/model --fractions 0.01 0.1
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import (HUMAN_CORPUS, LABEL_TASKS, PROTEIN_CODING_GENES, add_targets_option,  # noqa: E402
                    benchmark_parser, labelled_subset, logreg_hvg, read_result, shared_folder, write_result)
from exceiver import Exceiver, pretrain  # noqa: E402
from exceiver.finetune import finetune  # noqa: E402

# The human corpus less pollen2014 (65 cells), as this study has pretrained its base from the start.
CORPUS = [file for file in HUMAN_CORPUS if file != "pollen2014_cortex_fluidigm_65"]
METHODS = ("annotate_base", "annotate_continued", "annotate_own", "probe", "finetuned", "scratch", "logreg_hvg")
FRACTIONS = (0.01, 0.1, 1.0)


def load_target(data: Path, name: str, seed: int = 0):
    """(train pool AnnData, test AnnData, label column, gene_key) of a target task."""
    target = LABEL_TASKS[name]
    adata, key, gene_key = target.read(data), target.label_key, target.gene_key
    if name == "cellbench_cell_line":  # across assays: train on the larger assay, test on the other
        assays = adata.obs[target.batch_key].value_counts()
        train = (adata.obs[target.batch_key] == assays.index[0]).to_numpy()
        return adata[train].copy(), adata[~train].copy(), key, gene_key, f"train {assays.index[0]}, test {assays.index[1]}"
    labels = adata.obs[key].astype(str)
    train, test = train_test_split(np.arange(adata.n_obs), test_size=0.2, random_state=seed, stratify=labels)
    return adata[np.sort(train)].copy(), adata[np.sort(test)].copy(), key, gene_key, "80/20 stratified split"


def unsupervised_models(base: Exceiver, pool: ad.AnnData, gene_key: str | None, minutes: float, folder: Path,
                        seed: int = 0) -> dict[str, Exceiver]:
    """The base continued on the task's training cells, and the default preset trained from scratch
    on them, for the same minutes (labels unseen; saved, so a rerun reuses them)."""
    models = {}
    for name, warm in (("continued", {"init": base, "extend_genes": True}), ("own", {})):
        out = folder / name
        if not (out / "config.json").exists():
            pretrain(pool, out, gene_key=gene_key, max_minutes=minutes, max_epochs=100_000, patience=100_000,
                     seed=seed, progress=False, overwrite=True, **warm)
        models[name] = Exceiver.load(out)
    return models


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("transfer_results"))
    parser.add_argument("--base", type=Path, help="the pretrained model (default: pretrain one here)")
    parser.add_argument("--pretrain-minutes", type=float, default=10.0)
    parser.add_argument("--continue-minutes", type=float, default=2.0,
                        help="unsupervised training on each task's cells (annotate_continued, annotate_own)")
    parser.add_argument("--finetune-minutes", type=float, default=0.75, help="time budget per fine-tuning run")
    parser.add_argument("--max-epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    add_targets_option(parser, ["kang_condition", "pbmc3k_cell_type", "cellbench_cell_line"], flag="--tasks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shared = shared_folder()
    data = shared / "data"
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.base or args.out / "pretrained"
    if not (model_dir / "config.json").exists():
        start = time.time()
        pretrain([data / f"{n}.h5ad" for n in CORPUS], model_dir, genes=shared / PROTEIN_CODING_GENES,
                 max_minutes=args.pretrain_minutes, progress=False)
        print(f"pretrained in {time.time() - start:.0f} s")
    base = Exceiver.load(model_dir)
    print(f"pretrained model {model_dir}: {base}; val MSE ratio {base.metrics['val_mse_ratio']:.3f}, "
          f"{base.metrics['n_cells']} cells")
    results_file = args.out / "results.json"
    results = read_result(results_file, [])
    done = {(r["task"], r["fraction"], r["seed"], r["method"]) for r in results}
    for task in args.tasks:
        pool, test, key, gene_key, protocol = load_target(data, task)
        y_test = test.obs[key].astype(str).to_numpy()
        models = None
        if {"annotate_continued", "annotate_own"} & set(args.methods):
            models = unsupervised_models(base, pool, gene_key, args.continue_minutes, args.out / "models" / task)
        for fraction in args.fractions:
            for seed in range(args.seeds):
                rows = labelled_subset(pool.obs[key].astype(str), fraction, seed)
                train = pool[rows].copy()
                for method in args.methods:
                    if (task, fraction, seed, method) in done:
                        continue
                    start = time.time()
                    if method == "logreg_hvg":
                        pred = logreg_hvg(train, test, key, gene_key, seed)
                    elif method.startswith("annotate_"):
                        model = base if method == "annotate_base" else models[method.removeprefix("annotate_")]
                        labels = model.annotate(train, test, key, inplace=False, min_confidence=0.0, gene_key=gene_key,
                                                progress=False)
                        pred = labels["exceiver_label"].to_numpy().astype(str)
                    else:
                        mode = {"finetuned": "full", "probe": "freeze", "scratch": "scratch"}[method]
                        clf = finetune(base, train, key, None, mode=mode, gene_key=gene_key, seed=seed,
                                       max_minutes=args.finetune_minutes, max_epochs=args.max_epochs,
                                       batch_size=32, progress=False)
                        pred = clf.predict(test, gene_key=gene_key, progress=False).to_numpy().astype(str)
                    r = dict(task=task, protocol=protocol, fraction=fraction, seed=seed, method=method,
                             n_train=len(rows), n_test=len(y_test), seconds=round(time.time() - start, 1),
                             accuracy=accuracy_score(y_test, pred),
                             macro_f1=f1_score(y_test, pred, average="macro"))
                    results.append(r)
                    write_result(results, results_file)
                    print(f"{task:20s} {fraction:>5} seed {seed} {method:18s} n={len(rows):5d} "
                          f"macro-F1 {r['macro_f1']:.3f} acc {r['accuracy']:.3f} ({r['seconds']} s)", flush=True)
    report(pd.DataFrame(results), args.out)


def report(df: pd.DataFrame, out: Path) -> None:
    table = df.groupby(["task", "fraction", "method"]).agg(
        n_train=("n_train", "mean"), macro_f1=("macro_f1", "mean"), macro_f1_sd=("macro_f1", "std"),
        accuracy=("accuracy", "mean"), accuracy_sd=("accuracy", "std"), runs=("seed", "count")).reset_index()
    lines = ["| task | labels | method | train cells | macro-F1 | accuracy |", "|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r.task} | {r.fraction:.0%} | {r.method} | {r.n_train:.0f} | "
                     f"{r.macro_f1:.3f} ± {r.macro_f1_sd:.3f} | {r.accuracy:.3f} ± {r.accuracy_sd:.3f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    tasks = list(dict.fromkeys(df.task))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in [m for m in METHODS if m in set(df.method)]:
            t = table[(table.task == task) & (table.method == method)]
            ax.errorbar(t.fraction, t.macro_f1, yerr=t.macro_f1_sd, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        fractions = sorted(set(df.fraction))
        ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
        ax.set_title(task)
        ax.set_xlabel("labelled training cells")
        ax.set_ylabel("macro-F1 (held-out cells)")
        ax.set_ylim(0, 1.02)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "transfer.png", dpi=120)


if __name__ == "__main__":
    main()
