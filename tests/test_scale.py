"""Scaling up: distributed training matches one process, masks do not depend on global RNG."""

import json
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import load_file

from exceiver.data import CellBatcher
from exceiver.model import ExceiverConfig
from exceiver.preprocess import GeneScaler
from exceiver.vocab import CellCounts


def equal_length_cells(n_cells: int = 80, n_genes: int = 60, n_expressed: int = 20, seed: int = 0) -> ad.AnnData:
    """Every cell expresses the same number of genes, so every process of a distributed run masks
    as many genes as its share of a one-process batch (the loss is a mean per process)."""
    rng = np.random.default_rng(seed)
    indices = np.concatenate([np.sort(rng.choice(n_genes, n_expressed, replace=False)) for _ in range(n_cells)])
    counts = rng.integers(1, 30, n_cells * n_expressed).astype(np.float32)
    indptr = np.arange(0, n_cells * n_expressed + 1, n_expressed)
    return ad.AnnData(sp.csr_matrix((counts, indices, indptr), shape=(n_cells, n_genes)),
                      obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]),
                      var=pd.DataFrame(index=[f"G{j}" for j in range(n_genes)]))


def test_training_masks_do_not_depend_on_the_global_rng():
    adata = equal_length_cells(n_cells=10)
    cells = CellCounts(adata.X, np.ones((1, adata.n_vars), bool), np.zeros(10, np.int32),
                       np.asarray(adata.obs_names), ["cells"])
    config = ExceiverConfig.preset("default", n_genes=adata.n_vars)
    scaler = GeneScaler.fit(cells)
    batches = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        batcher = CellBatcher(cells, scaler, config, masked=True, seed=5)
        batches.append([batcher(list(range(10))).query_ids for _ in range(2)])
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])
    assert not torch.equal(batches[0][0], batches[0][1])  # each batch draws fresh masks
    other_seed = CellBatcher(cells, scaler, config, masked=True, seed=6)(list(range(10))).query_ids
    assert not torch.equal(other_seed, batches[0][0])


def _pretrain_cli(data, out, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "exceiver.cli", "-q", "pretrain", str(data), "--out", str(out),
               "--max-epochs", "2", "--seed", "1", "--accelerator", "cpu", *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_two_process_cpu_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    """2 gloo processes with 8 cells each per step vs 1 process with 16: the same global batches,
    the same masks, averaged gradients; the weights agree up to float32 summation order."""
    data = tmp_path / "cells.h5ad"
    equal_length_cells().write_h5ad(data)
    one = _pretrain_cli(data, tmp_path / "one", "--devices", "1", "--batch-size", "16")
    two = _pretrain_cli(data, tmp_path / "two", "--devices", "2", "--strategy", "ddp", "--batch-size", "8")
    assert one["steps"] == two["steps"] == 10  # 72 training cells in 5 global batches, 2 epochs
    assert two["val_masked_mse"] == pytest.approx(one["val_masked_mse"], rel=1e-4)
    single, distributed = (load_file(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    assert single.keys() == distributed.keys()
    for name, weight in single.items():
        torch.testing.assert_close(distributed[name], weight, rtol=0, atol=2e-4, msg=name)
