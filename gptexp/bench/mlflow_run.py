"""The bench as one MLflow run in experiment `bench`: params, every figure as a metric, the JSON."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ..tags import TAG_BENCH_QUICK, TAG_JOB
from ..tracking import get_client, log_flat_params, log_metrics, tracked_run

EXPERIMENT = "bench"


def flat_metrics(result: dict) -> dict[str, float]:
    """Every finite number of the figures and ratios as a metric named by its path (train.fast_fp32.tokens_per_s)."""
    metrics = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
            metrics[prefix] = float(obj)

    for section in ("peak", "optimizer", "train", "logging", "eval", "generate", "data"):
        walk(section, result.get(section, {}))
    metrics = {k: v for k, v in metrics.items() if ".times_s" not in k}
    walk("ratio", result["ratios"])
    metrics["elapsed_s"] = result["elapsed_s"]
    return metrics


def log_to_mlflow(result: dict, json_path: Path) -> str:
    """One run in experiment `bench` of the project's store: params, the figures as metrics, the JSON."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = get_client()
    name = f"bench-{result['timestamp']}" + ("-quick" if result["quick"] else "")
    with tracked_run(
        client, EXPERIMENT, run_name=name, tags={TAG_JOB: "bench", TAG_BENCH_QUICK: str(result["quick"]).lower()}
    ) as run_id:
        params = {f"sizes.{k}": v for k, v in result["sizes"].items()}
        params.update({f"env.{k}": v for k, v in result["env"].items()})
        params.update({f"settings.{k}": v for k, v in result["settings"].items()})
        params["quick"] = result["quick"]
        log_flat_params(client, run_id, params)
        metrics = flat_metrics(result)
        keys = list(metrics)
        for i in range(0, len(keys), 500):
            log_metrics(client, run_id, {k: metrics[k] for k in keys[i : i + 500]}, step=0)
        client.log_artifact(run_id, str(json_path))
    return run_id
