"""`NearestNeighbors(n_neighbors=k, algorithm=..., metric="euclidean").fit(X).kneighbors(X)` as splatfacto calls it:
exact brute force in float64 (torch, in row blocks), distances ascending. Ties may come back in another order than
sklearn's, with the same distances."""

from __future__ import annotations

import numpy as np
import torch


class NearestNeighbors:
    def __init__(self, n_neighbors: int = 5, algorithm: str = "auto", metric: str = "euclidean", **kwargs) -> None:
        if metric not in ("euclidean", "minkowski") or kwargs.get("p", 2) != 2:
            raise NotImplementedError(f"GPU-kit shim of sklearn: only the euclidean metric, not {metric!r}")
        self.n_neighbors = n_neighbors
        self._fit = None

    def fit(self, X, y=None) -> "NearestNeighbors":
        self._fit = torch.as_tensor(np.asarray(X), dtype=torch.float64)
        return self

    def kneighbors(self, X=None, n_neighbors=None, return_distance: bool = True):
        k = n_neighbors or self.n_neighbors
        points = self._fit if X is None else torch.as_tensor(np.asarray(X), dtype=torch.float64)
        if k > self._fit.shape[0]:
            raise ValueError(f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, n_samples_fit = "
                             f"{self._fit.shape[0]}")
        distances, indices = [], []
        for block in torch.split(points, max(1, 2**24 // max(1, self._fit.shape[0]))):
            d = torch.cdist(block, self._fit, compute_mode="donot_use_mm_for_euclid_dist")
            value, index = torch.topk(d, k, dim=1, largest=False, sorted=True)
            distances.append(value)
            indices.append(index)
        distances, indices = torch.cat(distances).numpy(), torch.cat(indices).numpy()
        return (distances, indices) if return_distance else indices
