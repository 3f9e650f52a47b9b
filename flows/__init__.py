"""Prefect flows and the `rlhf` CLI."""
