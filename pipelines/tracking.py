"""The flow's MLflow parent run, under which every stage's run of the same flow run is nested.

The parent lives in the benchmark's experiment (``ntu120-xsub``...), the one the stages log to, in the
store the stages use (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the project root, which
is the working directory of the flow and of DVC). Stages find it through ``MLFLOW_PARENT_RUN_ID``
(see :mod:`stages.tracking`). The client API is used rather than MLflow's process-wide active run, so
running the flow leaves no MLflow state behind in the calling process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from stages.tracking import DEFAULT_TRACKING_URI, experiment_name


@contextlib.contextmanager
def parent_run(
    benchmark: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]
) -> Iterator[str]:
    """An MLflow run in ``benchmark``'s experiment logging ``params``; yields its id. It ends
    FINISHED when the block completes, FAILED when it raises."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunStatus

    client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    name = experiment_name(benchmark)
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run_id = client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id
    status = RunStatus.FAILED
    try:
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        yield run_id
        status = RunStatus.FINISHED
    finally:
        client.set_terminated(run_id, RunStatus.to_string(status))
