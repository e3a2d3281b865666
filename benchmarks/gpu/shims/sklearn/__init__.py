"""GPU-kit shim for scikit-learn (with scipy, joblib and threadpoolctl about 50 MB). splatfacto's
populate_modules (`k_nearest_sklearn`) imports `sklearn.neighbors.NearestNeighbors` to set each seed point's
initial scale from its 3 nearest neighbours: `neighbors.py` here is a small exact implementation of that one use
(brute force in float64 with torch, as sklearn's euclidean metric gives). Anything else of sklearn raises."""

from _kit_shim import missing_module_getattr

__version__ = "0.0.0+gpu-kit-shim"
__getattr__ = missing_module_getattr("sklearn", "only sklearn.neighbors.NearestNeighbors (brute force) is provided")
