"""Clustering and classification of vectors on the sphere (document vectors): spherical k-means and cosine k-NN.

Spherical k-means (Dhillon & Modha 2001): assign each unit row x_i to argmax_c μ_cᵀx_i, set μ_c = Σ_{i∈c} x_i /
‖Σ_{i∈c} x_i‖; k-means++ seeding on cosine distance 1 − μᵀx. k-NN: majority label among the k rows of largest
cosine (ties broken by the summed cosine of each label).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np


def _unit_rows(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [n, D]; got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} holds a zero row (no direction on the sphere)")
    return x / norms


class KMeansResult(NamedTuple):
    labels: np.ndarray  # [n] int64
    centers: np.ndarray  # [k, D] unit rows
    objective: float  # Σ_i μ_{c(i)}ᵀ x_i (maximized)
    iterations: int


def spherical_kmeans(x, k: int, n_init: int = 4, max_iter: int = 100, seed: int = 0) -> KMeansResult:
    """Spherical k-means of the rows of x [n, D] (normalized first) into k clusters; the best of n_init runs."""
    x = _unit_rows(x, "x")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be an int in [1, n={x.shape[0]}]; got {k!r}")
    for name, value in (("n_init", n_init), ("max_iter", max_iter)):  # max_iter=0 left every label -1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    rng = np.random.default_rng(seed)
    best: Optional[KMeansResult] = None
    for _ in range(int(n_init)):
        centers = [x[rng.integers(x.shape[0])]]
        for _ in range(1, k):  # k-means++ on the cosine distance
            dist = np.clip(1 - np.max(x @ np.array(centers).T, axis=1), 0, None)
            p = dist / dist.sum() if dist.sum() > 0 else None
            centers.append(x[rng.choice(x.shape[0], p=p)])
        mu = np.array(centers)
        labels = np.full(x.shape[0], -1)
        iterations = 0
        for _ in range(max_iter):
            iterations += 1
            new = np.argmax(x @ mu.T, axis=1)
            if np.array_equal(new, labels):
                break
            labels = new
            for c in range(k):
                members = x[labels == c]
                if len(members) == 0:  # an empty cluster takes the row farthest from its centre
                    far = np.argmin(np.sum(x * mu[labels], axis=1))
                    mu[c] = x[far]
                    labels[far] = c
                else:
                    s = members.sum(0)
                    mu[c] = s / max(np.linalg.norm(s), 1e-300)
        objective = float(np.sum(x * mu[labels]))
        if best is None or objective > best.objective:
            best = KMeansResult(labels.astype(np.int64), mu, objective, iterations)
    return best


def knn_predict(train, train_labels, query, k: int = 3, exclude_self: bool = False) -> np.ndarray:
    """Labels of query rows [m, D] by majority over the k train rows [n, D] of largest cosine. exclude_self: query
    is train (leave-one-out: row i never votes for itself)."""
    a, q = _unit_rows(train, "train"), _unit_rows(query, "query")
    y = np.asarray(train_labels)
    if y.shape != (a.shape[0],):
        raise ValueError(f"train_labels must have shape ({a.shape[0]},); got {y.shape}")
    if a.shape[1] != q.shape[1]:
        raise ValueError(f"train and query must have the same dim; got {a.shape[1]} and {q.shape[1]}")
    if exclude_self and q.shape[0] != a.shape[0]:
        raise ValueError("exclude_self needs query to be the train rows")
    n_avail = a.shape[0] - (1 if exclude_self else 0)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_avail:
        raise ValueError(f"k must be an int in [1, {n_avail}]; got {k!r}")
    sims = q @ a.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    classes = np.unique(y)
    out = np.empty(q.shape[0], dtype=y.dtype)
    for i in range(q.shape[0]):
        votes = np.array([(y[top[i]] == c).sum() for c in classes], dtype=np.float64)
        weight = np.array([sims[i, top[i]][y[top[i]] == c].sum() for c in classes])
        out[i] = classes[np.lexsort((weight, votes))[-1]]
    return out
