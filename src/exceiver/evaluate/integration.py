"""How well cell embeddings integrate batches, scored as the field scores it: scib-metrics'
`Benchmarker` (bio conservation, batch correction and their weighted total), the numbers users
compare with scVI's in the scib papers and tutorials.

scib-metrics (and its jax) is an optional dependency (`pip install 'exceiver[scib]'`): without it
`evaluate --batch-key` keeps its own neighbour-mixing scores and says how to get these. Its first
call in a process spends about a minute compiling (numba: pynndescent's and kBET's neighbour code),
whatever the number of cells.
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pandas as pd

INSTALL_HINT = "pip install 'exceiver[scib]'"


def scib_installed() -> bool:
    return importlib.util.find_spec("scib_metrics") is not None


def scib_scores(representations: dict[str, np.ndarray], labels: np.ndarray, batches: np.ndarray, *,
                pre_integrated: str, n_jobs: int = 1) -> dict[str, dict[str, float]]:
    """scib-metrics' default bio-conservation and batch-correction metrics of each representation
    of the same cells, in one `Benchmarker`, not min-max scaled between representations (so that a
    score does not depend on what else was scored): {representation: {"bio", "batch", "total"}}
    (total = 0.6 bio + 0.4 batch, scib's weights).

    Parameters
    ----------
    representations
        Embeddings [cells, dims] of the same cells, by name.
    labels, batches
        Each cell's cell type and batch.
    pre_integrated
        The representation that stands for the uncorrected data (a PCA): scib's principal-component
        regression comparison measures how much batch variance each embedding removed from it.
    n_jobs
        Threads of scib-metrics' metrics.
    """
    import anndata as ad
    from scib_metrics.benchmark import Benchmarker

    labels, batches = np.asarray(labels).astype(str), np.asarray(batches).astype(str)
    if len(np.unique(batches)) < 2:
        raise ValueError("scib's batch correction needs 2 batches or more")
    if pre_integrated not in representations:
        raise ValueError(f"the pre-integrated representation {pre_integrated!r} is not among {sorted(representations)}")
    logging.getLogger("scib_metrics").setLevel(logging.WARNING)  # a line per label that kBET skips
    obs = pd.DataFrame({"batch": batches, "label": labels}, index=[str(i) for i in range(len(labels))])
    cells = ad.AnnData(np.zeros((len(labels), 0), dtype=np.float32), obs=obs,
                       obsm={name: np.asarray(x, dtype=np.float32) for name, x in representations.items()})
    bench = Benchmarker(cells, batch_key="batch", label_key="label", embedding_obsm_keys=list(representations),
                        pre_integrated_embedding_obsm_key=pre_integrated, n_jobs=n_jobs, progress_bar=False)
    bench.benchmark()
    table = bench.get_results(min_max_scale=False)
    return {name: {"bio": float(table.loc[name, "Bio conservation"]),
                   "batch": float(table.loc[name, "Batch correction"]),
                   "total": float(table.loc[name, "Total"])} for name in representations}
