"""Cell labels from an obs column, checked the same way wherever labels are used (fine-tuning a
classifier, scoring embeddings in `evaluate`).

One policy: cells without a label (NaN) are left out of what uses the labels, and a logged warning
says how many; a column that leaves fewer than two classes, or classes with fewer cells than the
caller needs, is refused with the offending classes named and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from exceiver.errors import ExceiverInputError, plain

log = logging.getLogger(__name__)

SHOWN = 10  # small classes named in a message


@dataclass
class CellLabels:
    """The labelled cells of one obs column and their classes."""

    key: str
    labelled: np.ndarray  # bool per cell of the dataset: False where the label is missing
    values: np.ndarray  # the label of each labelled cell, as str
    counts: pd.Series  # labelled cells per class, largest first

    @property
    def classes(self) -> list[str]:
        return sorted(self.counts.index)

    @property
    def codes(self) -> np.ndarray:
        """Each labelled cell's class as an index into `classes`."""
        return pd.Categorical(self.values, categories=self.classes).codes.astype(np.int64)


def obs_column(obs: pd.DataFrame, key: str, name: str = "dataset") -> pd.Series:
    """The obs column `key`; refused, with the columns there are, when it is missing."""
    if key not in obs.columns:
        raise ExceiverInputError(f"{name}: obs has no column {key!r}; its columns: {plain(list(obs.columns))}")
    return obs[key]


def cell_labels(obs: pd.DataFrame, key: str, *, min_cells: int, name: str = "dataset") -> CellLabels:
    """The labels of obs column `key`: unlabelled cells left out (and counted in a log warning),
    refused unless at least two classes remain with `min_cells` cells or more each."""
    column = obs_column(obs, key, name)
    labelled = column.notna().to_numpy()
    n_missing = int((~labelled).sum())
    if n_missing == len(labelled):
        raise ExceiverInputError(f"{name}: none of its {len(labelled):,} cells has a {key!r} label")
    if n_missing:
        log.warning("%s: %s of %s cells have no %r label and are left out", name, f"{n_missing:,}",
                    f"{len(labelled):,}", key)
    values = column[labelled].astype(str).to_numpy()
    counts = pd.Series(values).value_counts()
    if len(counts) < 2:
        raise ExceiverInputError(f"{name}: label column {key!r} has a single class ({plain(counts.index[0])!r}): "
                                 "there is nothing to tell apart")
    small = counts[counts < min_cells]
    if len(small):
        sizes = ", ".join(f"{plain(label)}: {int(n)}" for label, n in small.head(SHOWN).items())
        sizes += ", ..." if len(small) > SHOWN else ""
        raise ExceiverInputError(f"{name}: {len(small)} {'classes' if len(small) > 1 else 'class'} of {key!r} "
                                 f"{'have' if len(small) > 1 else 'has'} fewer than {min_cells} cells ({sizes}); "
                                 "remove or merge them")
    return CellLabels(key, labelled, values, counts)
