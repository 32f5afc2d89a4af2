"""Judging embeddings: metrics, and the simple baselines a model must beat."""

from exceiver.evaluate.baselines import log_normalised, pca_embedding
from exceiver.evaluate.cells import knn_scores

__all__ = ["knn_scores", "log_normalised", "pca_embedding"]
