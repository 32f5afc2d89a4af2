"""Full fine-tuning: which learning rate for the pretrained weights, as a fraction of the new class
head's (`pretrained_lr_mult`)? Fine-tunes one pretrained model on the labelled reference of the
tasks of benchmarks/label_transfer.py (pbmc3k and kang: a random 10%; cellbench: the CEL-seq2 cells)
with a time budget per run, and scores macro-F1 on the query cells.

    EXCEIVER_SHARED=../shared python benchmarks/finetune_lr.py --model ../study/counts_log_values_flat_bottleneck/model
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from exceiver import Exceiver, finetune

TASKS = {  # name: (file, label column, gene key of symbol-named models)
    "pbmc3k_cell_type": ("pbmc3k_seurat_2638", "cell_type", None),
    "cellbench_cell_line": ("cellbench_lung_celllines_1408", "cell_type", "gene_symbol"),
    "kang_condition": ("kang2018_ifnb_harmony_2000", "condition", None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--gene-key", action="store_true", help="the model knows genes by symbol (cellbench)")
    parser.add_argument("--mults", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    parser.add_argument("--minutes", type=float, default=0.75, help="time budget per fine-tuning run")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = Path(os.environ["EXCEIVER_SHARED"]) / "data"
    base = Exceiver.load(args.model)
    rows = []
    for task in args.tasks:
        file, key, symbol_key = TASKS[task]
        adata = ad.read_h5ad(data / f"{file}.h5ad")
        if task == "cellbench_cell_line":
            ref = (adata.obs["assay"] == "CEL-seq2").to_numpy()
        else:
            ref = np.zeros(adata.n_obs, dtype=bool)
            ref[np.random.default_rng(0).choice(adata.n_obs, round(0.1 * adata.n_obs), replace=False)] = True
        gene_key = symbol_key if args.gene_key else None
        for mult in args.mults:
            clf = finetune(base, adata[ref].copy(), key, pretrained_lr_mult=mult, gene_key=gene_key,
                           max_minutes=args.minutes, max_epochs=40, batch_size=32, progress=False)
            pred = clf.predict(adata[~ref].copy(), inplace=False, gene_key=gene_key, progress=False).astype(str)
            truth = adata.obs[key].astype(str).to_numpy()[~ref]
            rows.append({"task": task, "pretrained_lr_mult": mult, "macro_f1": f1_score(truth, pred, average="macro"),
                         "val_macro_f1": clf.metrics["val_macro_f1"], "epochs": clf.metrics["epochs"]})
            print(rows[-1], flush=True)
    print(pd.DataFrame(rows).pivot_table(index="task", columns="pretrained_lr_mult", values="macro_f1").round(3))


if __name__ == "__main__":
    main()
