"""The Prefect flow train-ntu120 (pipelines/): overrides, DVC calls, retries, and whole runs.

The fast tests check the pieces against real DVC (override grammar, dag order, lock detection); the
slow ones run the flow under ``prefect_test_harness`` on a copy of the tiny project that the end-to-end
DVC test builds, so DVC's decisions (which stages run again, which are unchanged) are checked too.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from prefect.states import Failed

from pipelines import dvc_commands, services, summary
from pipelines.flow import SUMMARY_KEY, retry_when_locked, train_ntu120
from pipelines.set_params import (
    SetParamError,
    check_keys,
    merge,
    named_overrides,
    parse_set_param,
    to_override,
)
from tests.dvc_project import copy_built, dvc

ROOT = Path(__file__).resolve().parents[1]
# MLflow's and Prefect's SQLAlchemy models meet in this process only; their deprecation notes are noise.
pytestmark = pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


# -- overrides -------------------------------------------------------------------------------------


def test_unknown_key_names_what_exists():
    with pytest.raises(SetParamError) as info:
        check_keys(PARAMS, {"train.seed": 3, "train.epochs": 2})
    message = str(info.value)
    assert "unknown parameter 'train.epochs'" in message and "'train' has no key 'epochs'" in message
    assert "did you mean train.recipes.ctrgcn.epochs or train.recipes.adamw.epochs" in message
    with pytest.raises(SetParamError, match=r"'train\.seed' is a value, not a section"):
        check_keys(PARAMS, {"train.seed.x": 1})


def test_named_parameters_become_dotted_keys():
    assert named_overrides(PARAMS, streams=["joint"], epochs=3, raw_dir="/data/ntu") == {
        "train.streams": ["joint"],
        "data.raw_dir": "/data/ntu",
        f"train.recipes.{PARAMS['train']['recipe']}.epochs": 3,
    }
    assert named_overrides(PARAMS, recipe="ctrgcn", epochs=1) == {
        "train.recipe": "ctrgcn",
        "train.recipes.ctrgcn.epochs": 1,
    }
    assert merge({"train.seed": 2, "train.streams": ["joint"]}, {"train.streams": ["joint"]}) == {
        "train.seed": 2,
        "train.streams": ["joint"],
    }
    with pytest.raises(SetParamError, match=r"different values: train\.streams"):
        merge({"train.streams": ["bone"]}, {"train.streams": ["joint"]})


def test_epochs_go_to_the_recipe_the_overrides_choose(tmp_path, monkeypatch):
    """``-S train.recipe=ctrgcn --epochs 2`` set the epochs of params.yaml's recipe (adamw), not of the
    recipe the run then trained with."""
    import logging

    from pipelines import flow

    assert PARAMS["train"]["recipe"] != "ctrgcn"
    chosen = named_overrides(PARAMS, epochs=2, set_params={"train.recipe": "ctrgcn"})
    assert chosen == {"train.recipes.ctrgcn.epochs": 2}
    written = {}  # what the flow's set-params task hands to DVC's override code
    monkeypatch.setattr(flow, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(flow.dvc_commands, "set_params", lambda path, applied: written.update(applied))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    flow.apply_params.fn(tmp_path, {"train.recipe": "ctrgcn"}, {"epochs": 2})
    assert written == {"train.recipe": "ctrgcn", "train.recipes.ctrgcn.epochs": 2}


def test_overrides_reach_params_yaml_as_dvc_writes_them(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text((ROOT / "params.yaml").read_text())
    values = {
        "train.streams": ["joint", "bone_motion"],
        "train.recipes.adamw.lr": 1e-4,
        "train.dropout": 0.25,
        "export.int8": False,
        "data.raw_dir": "/data/it's a \\dir\\ with spaces\\",
        "evaluate.fusion_weights": {"joint": 1.0, "bone": 0.5},
        "evaluate.pairs": [[8, 9], [50, 52]],
        "parse.dataset": "12",
    }
    dvc_commands.set_params(params_file, values)
    written = yaml.safe_load(params_file.read_text())
    for key, value in values.items():
        section, *rest = key.split(".")
        node = written[section]
        for part in rest:
            node = node[part]
        expected = {**PARAMS["evaluate"]["fusion_weights"], **value} if isinstance(value, dict) else value
        assert node == expected, key  # a mapping merges into the existing one, as with `-S`
    assert "# Every tunable value" in params_file.read_text()  # DVC keeps the comments
    before = params_file.read_text()
    with pytest.raises(ValueError, match="Invalid `--set-param` value"):
        dvc_commands.set_params(params_file, {"train.nope": 1})
    # DVC writes the string "off" unquoted (YAML 1.2); the stages' reader would see False.
    with pytest.raises(ValueError, match=r"train\.amp='off': DVC writes this as YAML"):
        dvc_commands.set_params(params_file, {"train.seed": 5, "train.amp": "off"})
    assert params_file.read_text() == before


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.streams=[joint,bone]", ("train.streams", ["joint", "bone"])),
        ("train.recipes.adamw.lr=1e-3", ("train.recipes.adamw.lr", 0.001)),
        ("export.int8=false", ("export.int8", False)),
        ("parse.dataset='12'", ("parse.dataset", "12")),
        ("data.raw_dir=/data/nturgb+d_skeletons", ("data.raw_dir", "/data/nturgb+d_skeletons")),
    ],
)
def test_command_line_values_read_like_dvc_exp_run(text, expected):
    assert parse_set_param(text) == expected
    key, value = expected
    assert parse_set_param(to_override(key, value)) == expected


def test_command_line_value_without_equals_is_rejected():
    with pytest.raises(SetParamError, match="expected KEY=VALUE"):
        parse_set_param("train.seed")


# -- DVC commands ----------------------------------------------------------------------------------


def test_stage_order_puts_dependencies_first():
    dot = "\n".join(
        [
            "strict digraph {",
            *(f'"{s}";' for s in ("synthesize", "parse", "features", "train_gcn@joint", "train_gcn@bone")),
            '"evaluate";',
            '"export";',
            '"features" -> "train_gcn@joint";',
            '"features" -> "train_gcn@bone";',
            '"evaluate" -> "export";',
            '"train_gcn@joint" -> "evaluate";',
            '"train_gcn@bone" -> "evaluate";',
            '"features" -> "export";',
            '"synthesize" -> "parse";',
            '"parse" -> "features";',
            "}",
        ]
    )
    assert dvc_commands.topological_order(dot) == [
        "synthesize",
        "parse",
        "features",
        "train_gcn@joint",
        "train_gcn@bone",
        "evaluate",
        "export",
    ]


def test_progress_bar_redraws_collapse_to_the_last():
    assert dvc_commands.terminal_line("a  0%\r a 50%\r a 100%\r\n") == " a 100%"
    assert dvc_commands.terminal_line("plain line\n") == "plain line"


def test_stage_outcome_reads_dvc_decision():
    assert dvc_commands.stage_outcome("Running stage 'parse':\n> python ...") == "ran"
    assert dvc_commands.stage_outcome("Stage 'parse' didn't change, skipping") == "unchanged"
    cached = "Stage 'parse' is cached - skipping run, checking out outputs"
    assert dvc_commands.stage_outcome(cached) == "restored from run cache"


@pytest.fixture
def echo_project(tmp_path):
    """A DVC project of one stage that writes its param into out.txt."""
    (tmp_path / "params.yaml").write_text("word: hello\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  echo:\n    cmd: python -c \"import yaml; print(yaml.safe_load(open('params.yaml'))"
        "['word'], file=open('out.txt', 'w')); print('said it')\"\n"
        "    params: [word]\n    outs: [out.txt]\n"
    )
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q")
    dvc(tmp_path, "config", "core.analytics", "false")
    return tmp_path


def test_dvc_output_streams_and_failures_carry_the_tail(echo_project):
    lines: list[str] = []
    output = dvc_commands.run(echo_project, ["repro", "--single-item", "echo"], lines.append)
    assert "said it" in lines and dvc_commands.stage_outcome(output) == "ran"
    assert (echo_project / "out.txt").read_text() == "hello\n"
    again = dvc_commands.run(echo_project, ["repro", "--single-item", "echo"], lines.append)
    assert dvc_commands.stage_outcome(again) == "unchanged"
    with pytest.raises(dvc_commands.DvcCommandError) as info:
        dvc_commands.run(echo_project, ["repro", "--single-item", "nope"], lines.append)
    assert not isinstance(info.value, dvc_commands.DvcLockError)
    assert "`dvc repro --single-item nope` failed" in str(info.value) and "nope" in info.value.tail[-1]
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)  # crosses processes intact


def test_experiment_names_that_dvc_would_refuse_fail_early(echo_project):
    with pytest.raises(ValueError, match="'bad name' is not a valid git reference name"):
        dvc_commands.check_experiment_name(echo_project, "bad name")
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "add", "-A"], cwd=echo_project, check=True)
    subprocess.run(["git", *identity, "commit", "-q", "-m", "echo"], cwd=echo_project, check=True)
    dvc(echo_project, "repro")
    dvc_commands.check_experiment_name(echo_project, "taken")
    dvc(echo_project, "exp", "save", "--name", "taken")
    with pytest.raises(ValueError, match="a DVC experiment named 'taken' already exists"):
        dvc_commands.check_experiment_name(echo_project, "taken")


def test_busy_repository_lock_is_the_retried_failure(echo_project):
    import zc.lockfile

    (echo_project / ".dvc" / "tmp").mkdir(exist_ok=True)
    held = zc.lockfile.LockFile(str(echo_project / ".dvc" / "tmp" / "lock"))
    try:
        with pytest.raises(dvc_commands.DvcLockError) as info:
            dvc_commands.run(echo_project, ["repro", "--single-item", "echo"], lambda line: None)
    finally:
        held.close()
    assert retry_when_locked(None, None, Failed(data=info.value))
    stage_error = dvc_commands.DvcCommandError(["repro"], 1, ["synthesize: error: bad value"])
    assert not retry_when_locked(None, None, Failed(data=stage_error))


# -- summary and local services --------------------------------------------------------------------


def test_summary_markdown_handles_a_missing_package_stage():
    run = summary.RunSummary(
        experiment="brave-panda",
        mlflow_experiment="ntu120-xsub",
        mlflow_run_id="abc123",
        stages={"parse": "unchanged", "train_gcn@joint": "ran"},
        metrics={"data/evaluate/metrics.json": {"centre_clip.fused.top1": 0.9}},
        model=None,
        bundle=None,
    )
    text = summary.markdown(run)
    assert "| train_gcn@joint | ran |" in text
    assert "| data/evaluate/metrics.json | centre_clip.fused.top1 | 0.9 |" in text
    assert "data/reports/package.json` is absent" in text and "No bundle" in text
    packaged = summary.RunSummary(**{**run.__dict__, "model": {"name": "ntu120-ctrgcn", "version": 3}})
    assert "| version | 3 |" in summary.markdown(packaged)


def test_services_stop_only_what_they_started(tmp_path):
    sleeper = services.Service(
        "sleeper", (sys.executable, "-c", "import time; time.sleep(60)"), lambda: True, "-"
    )
    proc = services.start(sleeper, tmp_path)
    assert services.recorded(tmp_path, "sleeper").pid == proc.pid
    assert services.stop(tmp_path, "sleeper")
    assert proc.wait(timeout=5) is not None and not (tmp_path / "sleeper.pid").exists()
    # A pid file whose process has a different start time (a reused pid) is never signalled.
    (tmp_path / "other.pid").write_text(f"{psutil.Process().pid} 1.0\n")
    assert services.recorded(tmp_path, "other") is None and not services.stop(tmp_path, "other")


def test_deploy_refuses_to_serve_without_a_server(capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines import deploy

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert deploy.main() == 2
    assert "set PREFECT_API_URL=http://127.0.0.1:4200/api" in capsys.readouterr().err


# -- the flow, end to end --------------------------------------------------------------------------

# With streams=["joint"] and epochs=1, the smallest run that passes every stage: 3 classes, no INT8.
TINY = {"export.int8": False}


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect server for all flow tests (it takes a while to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def committed_project(built_project, tmp_path_factory):
    """A copy of the built tiny project with a git commit (DVC experiments are git references) and a
    fresh MLflow store."""
    project = copy_built(built_project, tmp_path_factory.mktemp("flow") / "project")
    (project / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", *identity, "commit", "-q", "-m", "tiny"], cwd=project, check=True)
    return project


@pytest.fixture
def flow_project(committed_project, prefect_api, monkeypatch):
    """The committed tiny project as the working directory, tracking to its own mlflow.db."""
    monkeypatch.chdir(committed_project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
    return committed_project


# Every filter, sort, limit and offset is given: Prefect 3.8's sync client sends a missing one as
# null, which its server rejects (422).


def task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=100,
        )


def summary_artifacts(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
    )
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_KEY])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(),
            sort=ArtifactSort.UPDATED_DESC,
            limit=10,
            offset=0,
        )


@pytest.mark.slow
def test_flow_runs_every_stage_as_one_experiment(flow_project):
    from mlflow import MlflowClient

    state = train_ntu120(
        set_params=TINY, streams=["joint"], epochs=1, experiment="tiny-flow", return_state=True
    )
    assert state.is_completed(), state.message
    result = state.result()
    stages = list(result.stages)
    core = ["synthesize", "parse", "features", "train_gcn@joint", "evaluate", "export"]
    assert stages == dvc_commands.stage_order(flow_project) and [s for s in stages if s in core] == core
    # The project was built with 2 epochs of both streams: what depends on the joint stream's training
    # runs again; the data and the pose branch are unchanged.
    again = {
        "train_gcn@joint",
        "evaluate",
        "export",
        "package",
        "finetune_video",
        "export_video",
        "evaluate_video",
    }
    assert result.stages == {s: "ran" if s in again else "unchanged" for s in stages}

    runs = task_runs(state.state_details.flow_run_id)
    assert {run.name for run in runs} >= set(stages) and len(runs) == len(stages) + 5
    assert all(run.state.is_completed() for run in runs), [(r.name, r.state.name) for r in runs]
    [artifact] = summary_artifacts(state.state_details.flow_run_id)
    assert "| train_gcn@joint | ran |" in artifact.data and "centre_clip.fused.top1" in artifact.data
    assert str(flow_project / "data/export/bundle") in artifact.data
    # The registered model: package ran, so its report (data/reports/package.json) is in the summary.
    assert result.model is not None and result.model == summary.package_report(flow_project)
    assert result.model["version"] >= 1  # a registered version, named in the summary artifact
    assert f"| version | {result.model['version']} |" in artifact.data

    # The same values in params.yaml (so in the DVC experiment) and in the MLflow parent run.
    params = yaml.safe_load((flow_project / "params.yaml").read_text())
    assert params["train"]["streams"] == ["joint"] and params["train"]["recipes"]["adamw"]["epochs"] == 1
    assert "tiny-flow" in dvc(flow_project, "exp", "list")
    trained = json.loads((flow_project / "data/reports/train/joint/metrics.json").read_text())
    assert trained["epochs"] == 1
    client = MlflowClient(f"sqlite:///{flow_project / 'mlflow.db'}")
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["train.recipes.adamw.epochs"] == "1"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert {run.info.run_name for run in children} >= {"train_gcn@joint", "evaluate"}


@pytest.mark.slow
def test_flow_rejects_an_unknown_key_before_any_stage(flow_project):
    before = (flow_project / "params.yaml").read_text()
    state = train_ntu120(set_params={"train.epochs": 1}, return_state=True)
    assert state.is_failed() and "unknown parameter 'train.epochs'" in state.message
    assert (flow_project / "params.yaml").read_text() == before
    check, set_params = task_runs(state.state_details.flow_run_id)
    assert check.state.is_completed() and set_params.state.is_failed()


@pytest.mark.slow
def test_failing_stage_fails_the_flow_with_its_message(flow_project):
    from mlflow import MlflowClient

    state = train_ntu120(set_params={**TINY, "synthesize.classes": [8, 999]}, return_state=True)
    assert state.is_failed()
    assert "dvc repro --single-item synthesize` failed" in state.message
    assert "synthesize: error: params.yaml [synthesize] classes [8, 999]" in state.message
    assert "unknown [999]" in state.message
    runs = {run.name: run for run in task_runs(state.state_details.flow_run_id)}
    assert runs["synthesize"].state.is_failed() and "parse" not in runs
    assert runs["synthesize"].run_count == 1  # a stage's own error is not retried
    client = MlflowClient(f"sqlite:///{flow_project / 'mlflow.db'}")
    [parent] = client.search_runs(
        [client.get_experiment_by_name("ntu120-xsub").experiment_id],
        f"tags.prefect_flow_run_id = '{state.state_details.flow_run_id}'",
    )
    assert parent.info.status == "FAILED"
