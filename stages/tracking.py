"""Experiment tracking behind a small interface, so stages' ``run()`` never import MLflow.

``run()`` functions receive a :class:`Tracker`; their ``main()`` opens an :func:`mlflow_run` (or a
:class:`NullTracker` with ``--no-mlflow``). The MLflow store is ``sqlite:///mlflow.db`` in the
working directory unless ``MLFLOW_TRACKING_URI`` says otherwise; one experiment per benchmark
(``ntu120-xsub``...). When ``MLFLOW_PARENT_RUN_ID`` is set (the Prefect flow sets it), the run is
nested under that parent run.

A tracking failure (a locked or unreachable store) is reported once and does not stop training:
losing hours of GPU time to a logging problem is the worse outcome.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow refuses any other character in a metric or parameter name, and with it the whole batch
_NAME_REFUSED = re.compile(r"[^\w\-. :/]")


def mlflow_name(key: str) -> str:
    """A metric or parameter name MLflow accepts: ``pck@0.2`` -> ``pck_0.2`` (other names unchanged)."""
    return _NAME_REFUSED.sub("_", key)


class Tracker(Protocol):
    run_id: str | None  # the MLflow run's id (None when nothing is tracked)

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def metric_steps(self, key: str) -> set[int]: ...


class NullTracker:
    """Records nothing (tests, ``--no-mlflow``); keeps what it was given for inspection."""

    run_id = None

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[str] = []
        self.tags: dict[str, str] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(str(path))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def metric_steps(self, key: str) -> set[int]:
        """The steps ``key`` was logged at (``None``: step 0, as MLflow records it)."""
        return {step or 0 for step, metrics in self.metrics if key in metrics}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and tuples become their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit(cwd: str | Path = ".") -> str:
    """``HEAD``'s sha (with ``-dirty`` when tracked files changed), or ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def experiment_name(benchmark: str) -> str:
    """MLflow experiment of a benchmark: ``ntu120_xsub`` -> ``ntu120-xsub``."""
    return benchmark.replace("_", "-")


class MlflowTracker:
    """Logs to the active MLflow run; errors are reported once on stderr and then ignored."""

    def __init__(self, mlflow_module) -> None:
        self._mlflow = mlflow_module
        self._warned = False
        active = mlflow_module.active_run()
        self.run_id: str | None = active.info.run_id if active is not None else None

    def _call(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # tracking must not stop the stage
            if not self._warned:
                print(
                    f"warning: MLflow logging failed ({type(exc).__name__}: {exc}); continuing",
                    file=sys.stderr,
                )
                self._warned = True

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {mlflow_name(k): str(v)[:6000] for k, v in flatten(params).items()}
        self._call(self._mlflow.log_params, flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {mlflow_name(k): float(v) for k, v in metrics.items() if v is not None and v == v}  # drop NaN
        self._call(self._mlflow.log_metrics, clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call(self._mlflow.log_artifact, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call(self._mlflow.set_tags, tags)

    def metric_steps(self, key: str) -> set[int]:
        """The steps the run holds ``key`` at (empty when it has none, or the store cannot say)."""
        steps: set[int] = set()
        if self.run_id is not None:

            def read() -> None:
                history = self._mlflow.MlflowClient().get_metric_history(self.run_id, mlflow_name(key))
                steps.update(m.step for m in history)

            self._call(read)
        return steps


@contextlib.contextmanager
def mlflow_run(
    benchmark: str, run_name: str, stage: str, resume_id: str | None = None, *, required: bool = False
) -> Iterator[Tracker]:
    """An MLflow run in the benchmark's experiment, tagged with the git commit and the DVC stage;
    ``resume_id``: the run a resumed stage continues (its checkpoint names it), when the store still
    has it in this experiment and it is not deleted, so one run holds every epoch; else a new run.
    A store that cannot be opened (unreachable, locked) is reported and the stage goes on untracked
    (a :class:`NullTracker`), unless ``required`` (the package stage: registering is its job)."""
    import mlflow  # imported here: starting MLflow is the CLI's business, not the library's

    try:
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
        experiment = mlflow.set_experiment(experiment_name(benchmark))
        parent = os.environ.get("MLFLOW_PARENT_RUN_ID")
        if resume_id is not None:
            try:
                info = mlflow.get_run(resume_id).info
            except Exception:  # gone, or another store
                info = None
            # a deleted run (in the UI's trash) cannot be reopened: start_run refuses it
            deleted = info is not None and info.lifecycle_stage == "deleted"
            if info is None or info.experiment_id != experiment.experiment_id or deleted:
                resume_id = None
        if resume_id is not None:
            started = mlflow.start_run(run_id=resume_id, nested=bool(parent))
        else:
            started = mlflow.start_run(run_name=run_name, parent_run_id=parent, nested=bool(parent))
    except Exception as exc:  # MLflow raises many kinds (MlflowException, OSError, HTTP errors)
        if required:
            raise
        print(
            f"warning: MLflow tracking is unavailable ({type(exc).__name__}: {str(exc)[:300]}); "
            f"{stage} goes on without it",
            file=sys.stderr,
        )
        yield NullTracker()
        return
    with started:
        tracker = MlflowTracker(mlflow)
        tracker.set_tags(
            {"git_commit": git_commit(), "mlflow.source.git.commit": git_commit(), "dvc_stage": stage}
        )
        yield tracker
