"""Do cell embeddings separate annotated cell groups?"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier


def knn_scores(embedding: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray,
               k: int = 15) -> dict[str, float]:
    """Accuracy and macro-F1 of a k-nearest-neighbour classifier fitted on `train` cells and
    scored on held-out `test` cells (Euclidean distance)."""
    labels = np.asarray(labels).astype(str)
    knn = KNeighborsClassifier(n_neighbors=min(k, len(train))).fit(embedding[train], labels[train])
    predicted = knn.predict(embedding[test])
    return {
        "accuracy": float(accuracy_score(labels[test], predicted)),
        "macro_f1": float(f1_score(labels[test], predicted, average="macro")),
    }
