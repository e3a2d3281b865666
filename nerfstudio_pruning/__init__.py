"""Gaussian-splat pruning methods (PUP 3D-GS, VEDAL) for Nerfstudio."""

__version__ = "0.1.0"
