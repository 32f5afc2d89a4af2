"""Training throughput (cells/s).

1. End to end at pbmc3k statistics (`--baseline DIR`): `pretrain` on pbmc3k (the shared file) for
   a fixed number of epochs with this tree and with another checkout of exceiver (e.g. the commit
   an optimisation started from, in a git worktree), each in a fresh process with the same
   threads, in the same run; prints both training cells/s and the ratio.
2. The `paper` and `default` presets' training steps on synthetic cells with Tabula
Sapiens statistics, beside the dense formulation of the original (every vocabulary gene a token;
forward and backward of its encoder and processor only, so its cost is a lower bound), timed in
the same run; the data loader's throughput alone (tokenizing masked batches); and the achieved
FLOP/s of a training step (FLOPs counted by torch's FlopCounterMode) against the FLOP/s of a
large float32 matmul measured here (model FLOP utilisation, MFU).

3. The count objective at a large vocabulary (`--vocabulary`): `pretrain` on pbmc3k for a fixed
   number of epochs, each run in a fresh process with the same threads, in the same run: today's
   default (the 2,000 most variable protein-coding genes), then the whole protein-coding
   vocabulary (19,218 genes, 11,261 of them measured by pbmc3k) as today's default computes it,
   and with each cheaper setting added in turn (`VOCABULARY_CHANGES`), and the shipped
   `human-mouse-base` recipe (`shipped_model.BASE_MODEL`). Prints training cells/s
   and the ratio to the 2,000-gene default; and, as the learning check, each large-vocabulary
   run's validation count loss (always the dense NLL over every measured gene) and masked MSE
   ratio after the same number of steps, as ratios to today's computation at that vocabulary.

    python benchmarks/train_throughput.py [--cells 512] [--dense-cells 64] [--batch-size 16] [--threads N]
    git worktree add ../exceiver-start 5aabee0
    EXCEIVER_SHARED=../shared python benchmarks/train_throughput.py --baseline ../exceiver-start --epochs 3
    EXCEIVER_SHARED=../shared python benchmarks/train_throughput.py --vocabulary --epochs 8 --threads 1
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from common import PROTEIN_CODING_GENES, TARGETS, add_threads_option, benchmark_parser, shared_folder, threads
from embed_throughput import N_GENES, DenseOriginal, processor_cells_per_s, tabula_sapiens_like
from shipped_model import BASE_MODEL
from exceiver.data.loaders import CellBatcher
from exceiver.data.preprocess import GeneScaler
from exceiver.nn.config import pretraining_configs
from exceiver.nn.network import ExceiverModule
from exceiver.nn.objectives import pretraining_loss

# One pretraining run in a fresh process, importing exceiver from the `src` folder it is given;
# argv[4]: pretrain's keyword arguments as JSON, "genes": [gene list file, whole list as the vocabulary?].
END_TO_END = """
import json, logging, sys, time, warnings
sys.path.insert(0, sys.argv[1])
import anndata as ad, torch
from exceiver import pretrain
warnings.filterwarnings("ignore"); logging.getLogger("lightning").setLevel(logging.ERROR)
adata = ad.read_h5ad(sys.argv[2])
options = json.loads(sys.argv[4])
if "genes" in options:
    from exceiver.data.vocab import GeneVocab, read_gene_list
    path, whole = options.pop("genes")
    options["genes"] = GeneVocab(read_gene_list(path)) if whole else read_gene_list(path)
model = pretrain(adata, None, max_epochs=int(sys.argv[3]), patience=100, progress=False, **options)
m = model.metrics
print(json.dumps({"steps": m["steps"], "seconds": m["seconds"], "cells": m["steps"] * model.training["batch_size"],
                  "threads": torch.get_num_threads(), "n_genes": len(model.vocab),
                  **{k: m.get(k) for k in ("val_counts", "val_mse_ratio", "best_step")}}))
"""
# The cheaper settings of the count objective at a large vocabulary, each added to the ones before.
VOCABULARY_CHANGES = [{"count_zero_samples": 256}, {"count_sampled_share": True}, {"count_rank": 32}]


def end_to_end(src: Path, data: Path, epochs: int, options: dict | None = None) -> dict:
    """Training cells/s of `pretrain` (default preset; `options`: its keyword arguments) run from
    the exceiver source tree `src`, and the run's validation metrics."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", END_TO_END, str(src), str(data), str(epochs), json.dumps(options or {})],
                         env=env, capture_output=True, text=True, check=True).stdout
    run = json.loads(out.strip().splitlines()[-1])
    return {**run, "cells_per_s": run["cells"] / run["seconds"]}


def vocabulary_study(data: Path, epochs: int, seed: int) -> None:
    """Training cells/s at 2,000 genes (today's default) and at the whole protein-coding
    vocabulary, today and with each of VOCABULARY_CHANGES added; the large vocabulary's validation
    count loss and masked MSE ratio as ratios to today's computation (the learning check)."""
    genes, here = str(shared_folder() / PROTEIN_CODING_GENES), Path(__file__).resolve().parents[1] / "src"
    runs = [("2,000 genes, today's default", {"genes": [genes, False], "n_top_genes": 2000})]
    model = {}
    for change in [{}, *VOCABULARY_CHANGES]:
        model = {**model, **change}
        settings = ", ".join(f"{k}={v}" for k, v in model.items()) or "as today"
        runs.append((f"all protein-coding genes, {settings}", {"genes": [genes, True], "n_top_genes": 0, "model": model}))
    runs.append(("all protein-coding genes, the human-mouse-base recipe", {"genes": [genes, True], "n_top_genes": 0,
                                                                           "model": BASE_MODEL}))
    results = [(name, end_to_end(here, data, epochs, {**options, "seed": seed})) for name, options in runs]
    default, today = results[0][1], results[1][1]
    for name, run in results:
        line = (f"{name:<98} {run['n_genes']:>6,} genes {run['cells_per_s']:7.1f} training cells/s "
                f"{run['cells_per_s'] / default['cells_per_s']:5.2f}x   ({run['steps']} steps in {run['seconds']:.1f} s, "
                f"{run['threads']} threads)")
        if run is not default:
            line += (f"   val count NLL {run['val_counts']:.4f} ({run['val_counts'] / today['val_counts']:.3f}x), "
                     f"val MSE ratio {run['val_mse_ratio']:.3f} ({run['val_mse_ratio'] / today['val_mse_ratio']:.3f}x)")
        print(line, flush=True)


def batches(cells, scaler, tokenizer, batch_size):
    batcher = CellBatcher(cells, scaler, tokenizer, masked=True, salt=0)
    return [batcher(list(range(i, min(i + batch_size, cells.n_cells)))) for i in range(0, cells.n_cells, batch_size)]


def loader_cells_per_s(cells, scaler, tokenizer, batch_size) -> float:
    start = time.perf_counter()
    batches(cells, scaler, tokenizer, batch_size)
    return cells.n_cells / (time.perf_counter() - start)


def train_step(module: ExceiverModule, objectives, optimizer, batch) -> None:
    loss = pretraining_loss(module, batch, objectives, salt=0).total
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def sparse_train(cells, scaler, config, tokenizer, objectives, batch_size) -> tuple[float, float]:
    """cells/s of training steps (tokenized beforehand) and FLOPs per cell."""
    module = ExceiverModule(config).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    prepared = batches(cells, scaler, tokenizer, batch_size)
    with FlopCounterMode(display=False) as counter:
        train_step(module, objectives, optimizer, prepared[0])
    flops_per_cell = counter.get_total_flops() / len(prepared[0])
    start = time.perf_counter()
    for batch in prepared:
        train_step(module, objectives, optimizer, batch)
    return cells.n_cells / (time.perf_counter() - start), flops_per_cell


def dense_train(cells, scaler, config, batch_size) -> float:
    model = DenseOriginal(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    zero_values = scaler.zero_values(np.arange(N_GENES))
    start = time.perf_counter()
    for first in range(0, cells.n_cells, batch_size):
        part = cells.subset(np.arange(first, min(first + batch_size, cells.n_cells)))
        values = np.tile(zero_values, (part.n_cells, 1))
        r, c = part.counts.nonzero()
        values[r, c] = scaler.cell_values(part)
        latents = model(torch.from_numpy(values), torch.from_numpy(part.counts.toarray() == 0))
        loss = latents.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return cells.n_cells / (time.perf_counter() - start)


def matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--cells", type=int, default=512)
    parser.add_argument("--dense-cells", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--baseline", type=Path, help="another exceiver checkout to compare end to end")
    parser.add_argument("--vocabulary", action="store_true", help="the count objective at a large vocabulary (3.)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the end-to-end runs")
    parser.add_argument("--seed", type=int, default=0, help="of the --vocabulary runs")
    add_threads_option(parser)
    args = parser.parse_args()
    threads(args.threads)  # the end-to-end runs inherit OMP_NUM_THREADS
    data = TARGETS["pbmc3k"].path(shared_folder() / "data")
    if args.vocabulary:
        vocabulary_study(data, args.epochs, args.seed)
        return
    if args.baseline:
        here = Path(__file__).resolve().parents[1] / "src"
        runs = {name: end_to_end(src, data, args.epochs) for name, src in (("baseline", args.baseline / "src"),
                                                                           ("this tree", here))}
        for name, run in runs.items():
            print(f"pbmc3k end to end, {name:<10} {run['cells_per_s']:8.1f} training cells/s "
                  f"({run['steps']} steps in {run['seconds']:.1f} s, {run['threads']} threads)")
        print(f"ratio: {runs['this tree']['cells_per_s'] / runs['baseline']['cells_per_s']:.1f}x")
        return
    torch.manual_seed(0)
    cells = tabula_sapiens_like(args.cells)
    scaler = GeneScaler.fit(cells)
    peak = matmul_flops()
    print(f"{cells.n_cells} synthetic cells, {N_GENES:,} genes, median {int(np.median(cells.n_genes_expressed))} "
          f"expressed genes per cell, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; float32 matmul: {peak / 1e9:.1f} GFLOP/s")
    paper = pretraining_configs("paper", n_genes=N_GENES)[0]
    dense = dense_train(cells.subset(np.arange(args.dense_cells)), scaler, paper, args.batch_size)
    print(f"{'dense original formulation, paper (lower bound)':<50} train {dense:8.1f} cells/s   1.0x")
    for preset in ("paper", "default"):
        config, tokenizer, objectives = pretraining_configs(preset, n_genes=N_GENES)
        rate, flops = sparse_train(cells, scaler, config, tokenizer, objectives, args.batch_size)
        loader = loader_cells_per_s(cells, scaler, tokenizer, args.batch_size)
        mfu = rate * flops / peak
        print(f"{'exceiver sparse tokens, ' + preset:<50} train {rate:8.1f} cells/s {rate / dense:6.1f}x   "
              f"loader alone {loader:8.1f} cells/s   {flops / 1e9:.2f} GFLOP/cell, MFU {100 * mfu:.0f}%")
    processor = processor_cells_per_s(paper, args.batch_size, train=True)
    print(f"{'processor alone, paper (same in both formulations)':<50} train {processor:8.1f} cells/s "
          f"{processor / dense:6.1f}x   = the most any sparse formulation can gain at this preset")


if __name__ == "__main__":
    main()
