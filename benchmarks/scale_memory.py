"""Peak memory of pretraining and embedding against the number of cells: streamed from disk (a
corpus from `build_corpus`, a backed .h5ad for `embed_file`) beside the in-memory path, measured
in the same run. Each step runs in a fresh process and reports its peak resident memory.

    python benchmarks/scale_memory.py [--cells 10000 100000] [--genes-per-cell 200] [--workdir /tmp/x]

Synthetic cells: a 19,067-gene vocabulary, `--genes-per-cell` expressed genes each (fewer than
Tabula Sapiens's ~2,000 so that a million cells fit this benchmark's disk and time); pretraining
runs a one-minute slice of an epoch with a small model, embedding visits every cell.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import benchmark_parser

N_GENES = 19_067
SMALL = dict(gene_dim=16, n_latents=16, latent_dim=32, n_layers=1, n_heads=2, cross_heads=2, ff_dim=64)


def write_cells(path: Path, n_cells: int, per_cell: int, seed: int = 0, chunk: int = 100_000) -> None:
    """Synthetic raw counts written as an .h5ad, generated in chunks."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    popularity = rng.pareto(1.2, N_GENES) + 1.0
    popularity /= popularity.sum()
    parts = []
    for start in range(0, n_cells, chunk):
        n = min(chunk, n_cells - start)
        genes = np.sort(rng.choice(N_GENES, (n, per_cell), p=popularity), axis=1)
        counts = sp.csr_matrix((1.0 + rng.poisson(2.0, n * per_cell).astype(np.float32), genes.ravel(),
                                np.arange(0, n * per_cell + 1, per_cell)), shape=(n, N_GENES))
        counts.sum_duplicates()
        parts.append(counts)
    adata = ad.AnnData(sp.vstack(parts, format="csr"), obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
                       var=pd.DataFrame(index=[f"G{j}" for j in range(N_GENES)]))
    adata.write_h5ad(path)


def step(name: str, n_cells: int, work: Path) -> dict:
    """One measured step, run in this (fresh) process."""
    import exceiver
    from exceiver.data.corpus import build_corpus

    data, corpus, model = work / f"cells_{n_cells}.h5ad", work / f"corpus_{n_cells}", work / f"model_{n_cells}"
    start = time.perf_counter()
    training = dict(model=SMALL, max_minutes=1.0, batch_size=64, progress=False, overwrite=True)
    if name == "build-corpus":
        build_corpus([data], corpus, overwrite=True, progress=False)
    elif name == "pretrain-streamed":
        exceiver.pretrain(corpus, model, **training)
    elif name == "pretrain-in-memory":
        exceiver.pretrain(data, None, **training)
    elif name == "embed-streamed":
        exceiver.Exceiver.load(model).embed_file(data, work / "embedded.h5ad", overwrite=True, progress=False)
    elif name == "embed-in-memory":
        import anndata as ad

        exceiver.Exceiver.load(model).embed(ad.read_h5ad(data), progress=False)
    return {"step": name, "cells": n_cells, "peak_mib": round(peak_rss_mib()),
            "seconds": round(time.perf_counter() - start, 1)}


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started. Not getrusage's ru_maxrss: that is
    kept across fork and exec, so a step would report the parent's peak (the benchmark process that
    generated the cells) whenever it is the larger; /proc's VmHWM belongs to this program alone."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # other systems


STEPS = ["build-corpus", "pretrain-streamed", "embed-streamed", "pretrain-in-memory", "embed-in-memory"]


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--genes-per-cell", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/exceiver_scale_memory"))
    parser.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step, args.cells[0], args.workdir)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{'cells':>9}  {'step':<20} {'peak MiB':>9} {'seconds':>8}")
    for n_cells in args.cells:
        data = args.workdir / f"cells_{n_cells}.h5ad"
        if not data.exists():
            write_cells(data, n_cells, args.genes_per_cell)
        for name in args.steps:
            out = subprocess.run([sys.executable, __file__, "--step", name, "--cells", str(n_cells),
                                  "--workdir", str(args.workdir)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{n_cells:>9,}  {name:<20} {result['peak_mib']:>9,} {result['seconds']:>8}", flush=True)


if __name__ == "__main__":
    main()
