"""rlhf_core: the library behind the pipeline (pure Python + torch; no Prefect)."""

__version__ = "0.1.0"
