"""Helpers for the tests, analyses and benchmarks only: random scenes and cameras, a trained run's tensors, rank
correlation, machine load, ns-viewer in a headless browser."""
