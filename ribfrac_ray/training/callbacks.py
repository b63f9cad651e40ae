"""Ray Train callback that logs every epoch's metrics to an MLflow run.

It runs in the Ray Train controller process, so the workers need no MLflow access
and only one process writes to the store during training.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.train import UserCallback

logger = logging.getLogger(__name__)


class MlflowEpochLogger(UserCallback):
    """Log rank 0's reported metrics to ``run_id`` with ``step`` = the epoch."""

    def __init__(self, tracking_uri: str, run_id: str, prefix: str = ""):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.prefix = prefix

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from ribfrac_ray.tracking import retry_locked

        if not metrics:
            return
        values = metrics[0]
        step = int(values.get("epoch", 0))
        timestamp = int(time.time() * 1000)
        entries = [
            Metric(f"{self.prefix}{key}", float(value), timestamp, step)
            for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        retry_locked(MlflowClient(self.tracking_uri).log_batch, self.run_id, metrics=entries)
