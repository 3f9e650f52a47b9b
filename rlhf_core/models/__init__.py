"""Loading, building and formatting for every model the pipeline uses."""
