"""Full fine-tuning: which learning rate for the pretrained weights, as a fraction of the new class
head's (`pretrained_lr_mult`)? Fine-tunes one pretrained model on the labelled reference of the
tasks of benchmarks/label_transfer.py (pbmc3k and kang: a random 10%; cellbench: the CEL-seq2 cells)
with a time budget per run, and scores macro-F1 on the query cells.

    EXCEIVER_SHARED=../shared python benchmarks/finetune_lr.py --model ../study/counts_log_values_flat_bottleneck/model
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from sklearn.metrics import f1_score

from common import LABEL_TASKS as TASKS, add_targets_option, benchmark_parser, reference_cells, shared_folder
from exceiver import Exceiver, finetune


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--gene-key", action="store_true", help="the model knows genes by symbol (cellbench)")
    parser.add_argument("--mults", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    parser.add_argument("--minutes", type=float, default=0.75, help="time budget per fine-tuning run")
    add_targets_option(parser, TASKS, flag="--tasks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = shared_folder() / "data"
    base = Exceiver.load(args.model)
    rows = []
    for task in args.tasks:
        target = TASKS[task]
        adata = target.read(data)
        ref = reference_cells(task, adata, seed=0)
        gene_key = target.gene_key if args.gene_key else None
        for mult in args.mults:
            clf = finetune(base, adata[ref].copy(), target.label_key, pretrained_lr_mult=mult, gene_key=gene_key,
                           max_minutes=args.minutes, max_epochs=40, batch_size=32, progress=False)
            pred = clf.predict(adata[~ref].copy(), inplace=False, gene_key=gene_key, progress=False).astype(str)
            truth = target.labels(adata)[~ref]
            rows.append({"task": task, "pretrained_lr_mult": mult, "macro_f1": f1_score(truth, pred, average="macro"),
                         "val_macro_f1": clf.metrics["val_macro_f1"], "epochs": clf.metrics["epochs"]})
            print(rows[-1], flush=True)
    print(pd.DataFrame(rows).pivot_table(index="task", columns="pretrained_lr_mult", values="macro_f1").round(3))


if __name__ == "__main__":
    main()
