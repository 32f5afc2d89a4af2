"""Judging models: reconstruction, cell and gene embeddings, beside the baselines a model must beat."""

from exceiver.evaluate.baselines import cell_baselines, log_normalised, pca_embedding
from exceiver.evaluate.cells import knn_scores
from exceiver.evaluate.report import evaluate

__all__ = ["cell_baselines", "evaluate", "knn_scores", "log_normalised", "pca_embedding"]
