"""Helpers for the tests and benchmarks only: random scenes and cameras, a trained run's tensors."""
