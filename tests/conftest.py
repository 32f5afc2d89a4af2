"""Shared fixtures: small synthetic count data, tiny model settings, the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

# A tiny architecture so that tests train in seconds on 2 CPU cores.
TINY = dict(gene_dim=8, n_latents=8, latent_dim=16, n_layers=1, n_heads=2, cross_heads=2, ff_dim=32)


def synthetic_counts(n_cells: int = 120, n_genes: int = 200, n_types: int = 3, seed: int = 0,
                     prefix: str = "G") -> ad.AnnData:
    """Negative-binomial-like counts where each cell type over-expresses its own gene program."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n_cells)
    base = rng.lognormal(-1.0, 1.0, n_genes)
    programs = rng.random((n_types, n_genes)) < 0.15
    rate = base[None, :] * np.where(programs[types], 6.0, 1.0)
    depth = rng.lognormal(0.0, 0.4, n_cells)[:, None]
    counts = rng.poisson(rng.gamma(2.0, rate * depth / 2.0)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical([f"type{t}" for t in types])},
                       index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"{prefix}{j:04d}" for j in range(n_genes)])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture
def counts_adata() -> ad.AnnData:
    return synthetic_counts()


@pytest.fixture
def counts_file(tmp_path: Path, counts_adata: ad.AnnData) -> Path:
    path = tmp_path / "cells.h5ad"
    counts_adata.write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder from EXCEIVER_SHARED (CI sets it; tests needing it skip without)."""
    value = os.environ.get("EXCEIVER_SHARED")
    if not value:
        pytest.skip("EXCEIVER_SHARED is not set: tests on the shared real datasets are skipped")
    path = Path(value)
    if not (path / "data").is_dir():
        pytest.fail(f"EXCEIVER_SHARED={value} has no data/ folder")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny model pretrained for two epochs on synthetic counts (shared by read-only tests)."""
    from exceiver import pretrain

    out = tmp_path_factory.mktemp("model") / "tiny"
    pretrain(synthetic_counts(), out, model=TINY, max_epochs=2, batch_size=32, progress=False)
    return out
