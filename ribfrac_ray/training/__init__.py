"""Training both networks with Ray Train: per-worker loops and the driver side."""
