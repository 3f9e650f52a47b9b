"""Thin Prefect tasks: each calls rlhf_core, writes its artifacts, and logs to its MLflow child run."""
