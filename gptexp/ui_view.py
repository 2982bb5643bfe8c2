"""What MLflow's UI shows first for gptexp's experiments, through the means the UI itself reads.

- The workflow: MLflow 3's UI opens in its GenAI mode unless the URL says
  `workflowType=machine_learning` (its sidebar switch writes that query; 3.17 has no server-side
  default). Every experiment gptexp creates is also tagged `mlflow.experimentKind` =
  `custom_model_development`, the experiment kind the UI's own selector writes.
- The columns and expanded rows: the runs page's "share" view, an experiment tag
  `mlflow.sharedViewState.<key>` holding the page's view state, opened with
  `?viewStateShareKey=<key>`. gptexp writes one named `gptexp`: the key metrics and params as
  columns, each sweep's searched params first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "gptexp"
VIEW_TAG = SHARED_VIEW_PREFIX + VIEW_KEY
WORKFLOW_QUERY = "workflowType=machine_learning"

# What a reader compares first: the objective, the training loss, a sweep's best, then the settings.
KEY_METRICS = ("epoch_val_loss", "epoch_train_loss", "best_value")
KEY_PARAMS = ("model.context_length", "train.lr", "train.batch_size", "data.stride", "train.num_epochs")


def column(kind: str, key: str) -> str:
    """The runs table's name for a column: metrics.`epoch_val_loss`, params.`train.lr`."""
    return f"{kind}.`{key}`"


def view_state(params: Sequence[str] = KEY_PARAMS) -> dict:
    columns = [column("metrics", k) for k in KEY_METRICS] + [column("params", k) for k in params]
    return {"selectedColumns": columns, "columnOrder": columns}


def _read_view(experiment) -> dict:
    try:
        state = json.loads(experiment.tags.get(VIEW_TAG, ""))
    except ValueError:
        return view_state()
    return state if isinstance(state, dict) else view_state()


def mark_experiment(client, experiment) -> None:
    """Tag `experiment` (an mlflow Experiment) as model training and give it gptexp's view, once."""
    tags = experiment.tags or {}
    if EXPERIMENT_KIND_TAG not in tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    if VIEW_TAG not in tags:
        client.set_experiment_tag(experiment.experiment_id, VIEW_TAG, json.dumps(view_state()))


def show_sweep(client, experiment_id: str, searched: Sequence[str]) -> None:
    """Put a sweep's searched params first among its experiment's view's param columns.

    (A shared view cannot expand a parent run: the UI drops `runsExpanded` from it. A sweep's
    trials are one click away in the table, and listed on the parent run's page.)"""
    state = _read_view(client.get_experiment(experiment_id))
    params = [c for c in state.get("selectedColumns", []) if c.startswith("params.")]
    wanted = [column("params", k) for k in searched]
    params += [c for c in wanted if c not in params]
    metrics = [column("metrics", k) for k in KEY_METRICS]
    columns = metrics + sorted(params, key=lambda c: (c not in wanted, wanted.index(c) if c in wanted else 0))
    state.update(selectedColumns=columns, columnOrder=columns)
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(state))


def experiment_url(base: str, experiment_id: str) -> str:
    """The model-training runs table of an experiment, in gptexp's view."""
    return f"{base}/#/experiments/{experiment_id}/runs?{WORKFLOW_QUERY}&viewStateShareKey={VIEW_KEY}"


def home_url(base: str) -> str:
    """The experiments list, in the model-training workflow."""
    return f"{base}/#/experiments?{WORKFLOW_QUERY}"


def links(client, base: str) -> list[str]:
    """The experiments list, then the runs table of each experiment gptexp wrote to, latest first."""
    from mlflow.entities import ViewType

    experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, order_by=["last_update_time DESC"])
    ours = [e for e in experiments if VIEW_TAG in (e.tags or {})]
    return [home_url(base)] + [f"{experiment_url(base, e.experiment_id)}  ({e.name})" for e in ours]


def main(argv: Sequence[str] | None = None) -> int:
    """`make ui`'s first lines: where to point the browser."""
    import argparse
    import contextlib
    import logging

    p = argparse.ArgumentParser(prog="python -m gptexp.ui_view", description=main.__doc__)
    p.add_argument("--base", required=True, help="the UI's address, e.g. http://127.0.0.1:5000")
    args = p.parse_args(argv)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    lines = [home_url(args.base)]
    with contextlib.suppress(Exception):  # a store it cannot read yet still has the experiments list
        from .tracking import get_client

        lines = links(get_client(), args.base)
    print("MLflow UI, model-training view:")
    for line in lines:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
