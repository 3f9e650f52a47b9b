"""Evaluating a tuned policy against its reference, and the promotion gate for the model registry."""
