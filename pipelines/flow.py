"""The Prefect flow ``train-ntu120``: the DVC pipeline, stage by stage, as one tracked experiment.

One flow run is one DVC experiment and one MLflow parent run holding the same values:

1. ``check-experiment`` fails early when the run could not be saved as a DVC experiment (no git
   commit, a name that is taken), and ``set-params`` writes the flow's parameters into
   ``params.yaml`` as ``dvc exp run -S`` would (:mod:`pipelines.set_params`); a key ``params.yaml``
   does not have stops the run before any stage.
2. ``stage-order`` reads the stages from ``dvc dag`` (``foreach`` items expanded, dependencies first).
3. One ``stage`` task per stage runs ``dvc repro --single-item <stage>``: DVC decides whether the stage
   runs or is skipped, the stage's output streams into the task's log, and its MLflow run nests under
   the flow's parent run (``MLFLOW_PARENT_RUN_ID``).
4. ``save-experiment`` records the workspace as the DVC experiment ``dvc exp save -n <name>``.
5. ``summary`` publishes the Markdown artifact ``train-ntu120-summary``: metrics, registered model,
   bundle.

The stages run in the flow's working directory, which must be the project root (a git repository
with a commit: DVC experiments are git references). DVC commands never overlap (one lock per process;
the ``local`` deployment serves one flow run at a time), and a DVC command is retried only when
another DVC process held the repository lock. A stage's failure fails the flow with the stage's
error message; it is not retried, it would fail the same way again.

    python -m pipelines.flow                       # the whole pipeline, params.yaml as it is
    python -m pipelines.flow --streams joint --epochs 2 -S train.seed=3
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings
from prefect.states import State

from pipelines import dvc_commands, summary
from pipelines.set_params import (
    SetParamError,
    check_keys,
    lookup,
    merge,
    named_overrides,
    parse_set_param,
    to_override,
)
from pipelines.tracking import parent_run
from stages.tracking import experiment_name, git_commit

FLOW_NAME = "train-ntu120"
SUMMARY_KEY = "train-ntu120-summary"
PARAMS_FILE = "params.yaml"
EPHEMERAL_STARTUP_S = 120


def retry_when_locked(task: Any, task_run: Any, state: State) -> bool:
    """Prefect's retry condition: retry only when DVC found its repository locked by another DVC
    process; any other failure is the stage's own and would repeat."""
    try:
        state.result()
    except dvc_commands.DvcLockError:
        return True
    except Exception:
        return False
    return False


# Every task that calls DVC: retried (after 10 s, 30 s, 90 s) only while the repository lock is busy.
# Prefect's cache stays off: whether a stage needs to run is DVC's decision.
DVC_TASK: dict[str, Any] = dict(
    retries=3, retry_delay_seconds=[10, 30, 90], retry_condition_fn=retry_when_locked, cache_policy=NO_CACHE
)


def check_git(root: Path) -> None:
    """DVC experiments are git references: ``root`` must be a git repository with a commit."""
    result = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", "HEAD"], cwd=root, capture_output=True, text=True
    )
    if result.returncode:
        raise RuntimeError(
            f"{root} is not a git repository with a commit, which DVC experiments need: run the flow "
            "from the project root of a git clone (or `git init && git add -A && git commit`)"
        )


@task(name="check-experiment", **DVC_TASK)
def check_experiment(root: Path, name: str) -> None:
    """Fail before any stage when the run could not be saved as the DVC experiment ``name``."""
    check_git(root)
    dvc_commands.check_experiment_name(root, name)
    get_run_logger().info("DVC experiment %s", name)


@task(name="set-params", cache_policy=NO_CACHE)
def apply_params(root: Path, overrides: dict[str, Any], named: dict[str, Any]) -> dict[str, Any]:
    """Check the overrides against ``params.yaml`` and write them as ``dvc exp run -S`` would; returns
    every override applied (``overrides`` plus the named flow parameters, as dotted keys)."""
    logger = get_run_logger()
    params_file = root / PARAMS_FILE
    current = yaml.safe_load(params_file.read_text())
    applied = merge(overrides, named_overrides(current, set_params=overrides, **named))
    check_keys(current, applied)
    if not applied:
        logger.info("no overrides: the stages run with %s as it is", PARAMS_FILE)
        return applied
    for key, value in applied.items():
        logger.info("-S %s", to_override(key, value))
    dvc_commands.set_params(params_file, applied)
    return applied


@task(name="stage-order", **DVC_TASK)
def read_stage_order(root: Path) -> list[str]:
    """The stages to run, dependencies first (``dvc dag``)."""
    stages = dvc_commands.stage_order(root)
    get_run_logger().info("stages: %s", ", ".join(stages))
    return stages


@task(name="stage", task_run_name="{stage}", **DVC_TASK)
def run_stage(root: Path, stage: str, parent_run_id: str) -> str:
    """``dvc repro --single-item <stage>``, its output in this task's log; returns what DVC did."""
    logger = get_run_logger()
    output = dvc_commands.run(
        root, ["repro", "--single-item", stage], logger.info, {"MLFLOW_PARENT_RUN_ID": parent_run_id}
    )
    return dvc_commands.stage_outcome(output)


@task(name="save-experiment", **DVC_TASK)
def save_experiment(root: Path, name: str) -> None:
    """Record the workspace (params, ``dvc.lock``, metrics) as the DVC experiment ``name``."""
    dvc_commands.run(root, ["exp", "save", "--name", name], get_run_logger().info)


@task(name="summary", **DVC_TASK)
def publish_summary(
    root: Path, name: str, mlflow_experiment: str, run_id: str, stages: dict[str, str]
) -> summary.RunSummary:
    """The run's :class:`~pipelines.summary.RunSummary`, also published as a Markdown artifact."""
    bundle = summary.bundle_dir(root)
    result = summary.RunSummary(
        experiment=name,
        mlflow_experiment=mlflow_experiment,
        mlflow_run_id=run_id,
        stages=stages,
        metrics=dvc_commands.metrics(root),
        model=summary.package_report(root),
        bundle=str(bundle) if bundle.is_dir() else None,
    )
    create_markdown_artifact(
        summary.markdown(result), key=SUMMARY_KEY, description=f"train-ntu120 run {name}"
    )
    return result


@flow(name=FLOW_NAME, description=__doc__.split("\n\n")[0])
def train_ntu120(
    set_params: dict[str, Any] | None = None,
    dataset: str | None = None,
    raw_dir: str | None = None,
    streams: list[str] | None = None,
    recipe: str | None = None,
    epochs: int | None = None,
    benchmark: str | None = None,
    experiment: str | None = None,
) -> summary.RunSummary:
    """Run the DVC pipeline in the working directory as the DVC experiment ``experiment`` (default:
    the flow run's name).

    ``set_params`` maps dotted ``params.yaml`` keys to values (``{"train.seed": 3}``: ``dvc exp run
    -S train.seed=3``); the named parameters are shortcuts for ``parse.dataset`` (synthetic | ntu60 |
    ntu120), ``data.raw_dir`` (the .skeleton directory), ``train.streams``, ``train.recipe``, the
    active recipe's ``epochs`` and ``train.benchmark``. ``None`` keeps ``params.yaml``'s value.
    """
    root = Path.cwd()
    name = experiment or flow_run.get_name()
    named = dict(
        dataset=dataset, raw_dir=raw_dir, streams=streams, recipe=recipe, epochs=epochs, benchmark=benchmark
    )
    check_experiment(root, name)
    applied = apply_params(root, dict(set_params or {}), named)
    active_benchmark = lookup(yaml.safe_load((root / PARAMS_FILE).read_text()), "train.benchmark")
    stages = read_stage_order(root)
    tags = {"git_commit": git_commit(root), "prefect_flow_run_id": str(flow_run.get_id())}
    with parent_run(active_benchmark, name, applied, {**tags, "dvc_experiment": name}) as run_id:
        mlflow_experiment = experiment_name(active_benchmark)
        get_run_logger().info("MLflow parent run %s in experiment %s", run_id, mlflow_experiment)
        outcomes = {stage: run_stage(root, stage, run_id) for stage in stages}
        save_experiment(root, name)
    return publish_summary(root, name, mlflow_experiment, run_id, outcomes)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.flow``: one flow run in this directory (no Prefect server needed)."""
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.flow",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "-S",
        "--set-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params.yaml value, as `dvc exp run -S` takes it (repeatable)",
    )
    ap.add_argument("--dataset", help="parse.dataset: synthetic | ntu60 | ntu120")
    ap.add_argument("--raw-dir", help="data.raw_dir: the directory of .skeleton files")
    ap.add_argument("--streams", type=lambda s: s.split(","), help="train.streams, comma-separated")
    ap.add_argument("--recipe", help="train.recipe")
    ap.add_argument("--epochs", type=int, help="epochs of the recipe that trains")
    ap.add_argument("--benchmark", help="train.benchmark, e.g. ntu120_xset")
    ap.add_argument("--name", help="the DVC experiment's (and MLflow parent run's) name")
    args = ap.parse_args(argv)
    try:
        overrides = dict(parse_set_param(text) for text in args.set_param)
    except SetParamError as exc:
        ap.error(str(exc))
    # With no PREFECT_API_URL, Prefect starts a temporary server for the run; its 20 s start-up limit
    # is too short for a busy 2-core machine.
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: EPHEMERAL_STARTUP_S}):
        state = train_ntu120(
            set_params=overrides,
            dataset=args.dataset,
            raw_dir=args.raw_dir,
            streams=args.streams,
            recipe=args.recipe,
            epochs=args.epochs,
            benchmark=args.benchmark,
            experiment=args.name,
            return_state=True,
        )
    if not state.is_completed():
        print(f"train-ntu120: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
