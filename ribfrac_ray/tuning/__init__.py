"""Hyperparameter search for the detector with Ray Tune.

``space`` reads a YAML search-space file into Tune samplers, ``search`` runs the
trials (one Ray Train run each) and records them in MLflow, and ``command`` is the
``ribfrac-ray tune`` subcommand. See docs/tuning.md.
"""
