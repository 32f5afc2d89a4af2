"""benchmarks/integration.py: its neighbour scores measure what their docstrings say (mixing within
a cell type, labels carried from the largest batch), on embeddings whose answer is known."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from integration import same_type_mixing, transfer_f1  # noqa: E402


def _two_types(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Two cell types of n cells each, each type half in batch a, half in batch b (alternating)."""
    labels = np.repeat(["t1", "t2"], n)
    batches = np.tile(["a", "b"], n)
    return labels, batches


def test_mixing_is_zero_where_batches_separate_and_near_one_where_they_interleave():
    labels, batches = _two_types()
    position = np.arange(len(labels), dtype=float)
    type_offset = np.where(labels == "t1", 0.0, 1e4)
    separated = np.stack([type_offset + np.where(batches == "a", 0.0, 1e3) + position * 1e-3, np.zeros(len(labels))], 1)
    interleaved = np.stack([type_offset + position, np.zeros(len(labels))], 1)
    assert same_type_mixing(separated, labels, batches) == 0.0
    # 15 neighbours on a line of alternating batches: 7 and 8 of them (entropy 0.691 of log 2 = 0.693)
    assert 0.99 < same_type_mixing(interleaved, labels, batches) <= 1.0


def test_mixing_is_relative_to_the_types_own_batches_and_skips_what_it_cannot_judge():
    labels, batches = _two_types()
    batches = np.where((labels == "t1") & (np.arange(len(labels)) % 4 == 1), "a", batches)  # t1: 3/4 a, 1/4 b
    rng = np.random.default_rng(0)
    shuffled = rng.normal(size=(len(labels), 2)) + np.where(labels == "t1", 0.0, 1e3)[:, None]
    score = same_type_mixing(shuffled, labels, batches)
    assert 0.85 < score < 1.05  # as mixed as the type's batches allow, whatever their proportions (0.93)
    one_batch = np.where(labels == "t1", "a", batches)  # t1 has a single batch: only t2 counts
    assert np.isclose(same_type_mixing(shuffled, labels, one_batch),
                      same_type_mixing(shuffled[labels == "t2"], labels[labels == "t2"], batches[labels == "t2"]))
    small = np.arange(len(labels)) % 5 == 0  # 8 cells a type: neighbours would be the whole type
    assert np.isnan(same_type_mixing(shuffled[small], labels[small], batches[small]))


def test_transfer_scores_only_the_types_the_largest_batch_has():
    labels = np.array(["t1"] * 30 + ["t2"] * 30 + ["t3"] * 10)
    batches = np.array((["ref"] * 20 + ["query"] * 10) * 2 + ["query"] * 10)  # t3 only in the query
    centre = {"t1": 0.0, "t2": 100.0, "t3": 200.0}
    embedding = np.array([[centre[label]] for label in labels]) + np.random.default_rng(0).normal(size=(70, 1))
    assert transfer_f1(embedding, labels, batches) == 1.0  # t3 (which no reference cell has) not counted
    moved = (labels == "t1") & (batches == "query")  # t1's query cells among t2's reference: all called t2
    mixed_up = np.where(moved[:, None], 100.0, embedding)
    # t1: F1 0; t2: precision 1/2, recall 1 (F1 2/3)
    assert np.isclose(transfer_f1(mixed_up, labels, batches), (0.0 + 2 / 3) / 2)


def test_the_pbmc_technologies_target_is_labelled_soundly(shared_dir):
    """The multi-technology PBMC target: four 10x technologies on their shared genes, pbmc3k's
    annotation carried to the other three by confident logistic-regression calls, and every kept
    type's canonical marker enriched in that type in every technology."""
    from pbmc_technologies import MIN_CONFIDENCE, PbmcTechnologies, soundness

    adata = PbmcTechnologies().read(shared_dir / "data")
    sizes = adata.obs["assay"].value_counts()
    assert set(sizes.index) == {"10x 3' v1", "10x 3' v2", "10x 3' v3", "10x 5'"} and sizes["10x 3' v1"] == 2638
    assert all(600 < sizes[a] <= 1000 for a in ("10x 3' v2", "10x 3' v3", "10x 5'"))  # confident calls (>= 0.9)
    assert MIN_CONFIDENCE == 0.9 and adata.n_vars > 10_000
    table = soundness(adata)
    assert len(table) >= 30 and (table["fold_change"] > 1.5).all(), table
