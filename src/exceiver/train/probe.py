"""The linear probe: logistic regression on a frozen cell embedding, folded into one linear layer.
Fine-tuning's "freeze" mode writes it into a class head; label transfer scores query cells with it."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


def linear_probe(embedding: np.ndarray, codes: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression (balanced class weights) on standardised embeddings, as the weight
    [n_classes, width] and bias [n_classes] of one linear layer on the raw embedding (the
    standardisation folded in): softmax(embedding @ weight.T + bias) are its probabilities.
    Every class 0..n_classes-1 must occur in `codes`."""
    scaler = StandardScaler().fit(embedding)
    fitted = LogisticRegression(class_weight="balanced", max_iter=2000).fit(scaler.transform(embedding), codes)
    coef, intercept = fitted.coef_, fitted.intercept_
    if n_classes == 2:  # one logit z for class 1: softmax([0, z]) is its sigmoid
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight = coef / scaler.scale_
    return weight.astype(np.float32), (intercept - weight @ scaler.mean_).astype(np.float32)
