"""Stage package: the promotion rule, registration in a temporary MLflow store, and the server loading
the champion by its registry alias."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from serving import model as model_loader
from stages import bundle, package
from stages.package import Decision, PackageParams, decide
from stages.params import ParamsError, from_mapping
from stages.registry import ModelVersion
from tests.serving_helpers import serving

NAME, BENCHMARK = "ntu120-ctrgcn", "ntu120_xsub"


# ---- the promotion rule -------------------------------------------------------------------------


def test_first_version_becomes_the_champion():
    assert decide(0.4, BENCHMARK, None) == Decision(True, "no champion yet")


@pytest.mark.parametrize(("top1", "promote"), [(0.91, True), (0.9, True), (0.89, False)])
def test_at_least_the_champions_top1_promotes(top1, promote):
    decision = decide(top1, BENCHMARK, ModelVersion("3", BENCHMARK, 0.9))
    assert decision.promote is promote
    assert ("0.90000 of the champion (version 3) on ntu120_xsub") in decision.reason
    assert (">=" if promote else "<") in decision.reason


@pytest.mark.parametrize(
    ("champion", "words"),
    [
        (ModelVersion("2", "ntu120_xset", 0.5), "evaluated on ntu120_xset, this one on ntu120_xsub"),
        (ModelVersion("2", None, 0.5), "an unrecorded benchmark"),
        (ModelVersion("2", BENCHMARK, None), "no recorded top-1"),
        # the synthetic corpus's champion (3 classes here) against a model of other classes: the real
        # NTU-120 model would never have beaten the synthetic 0.97 (an orchestration audit)
        (ModelVersion("2", BENCHMARK, 0.5, "8,9,10"), "classifies other actions (3 classes, this one 2"),
    ],
)
def test_a_champion_that_cannot_be_compared_keeps_the_alias(champion, words):
    decision = decide(0.99, BENCHMARK, champion, "8,9")
    assert not decision.promote and words in decision.reason and "by hand" in decision.reason


def test_the_same_classes_or_an_unrecorded_set_compare_by_top1():
    assert decide(0.99, BENCHMARK, ModelVersion("2", BENCHMARK, 0.5, "8,9,50"), "8,9,50").promote
    assert decide(0.99, BENCHMARK, ModelVersion("2", BENCHMARK, 0.5), "8,9,50").promote  # older versions
    assert not decide(0.4, BENCHMARK, ModelVersion("2", BENCHMARK, 0.5, "8,9,50"), "8,9,50").promote


@pytest.mark.parametrize("alias", ["latest", "V2", "two words", ""])
def test_reserved_or_malformed_aliases_are_refused(alias):
    with pytest.raises(ParamsError, match=r"\[package\] alias"):
        from_mapping("package", PackageParams, {"alias": alias})


# ---- inputs -------------------------------------------------------------------------------------


def _bundle_with_top1(tiny_bundle, root: Path, top1: float, version: str) -> tuple[Path, Path]:
    """A copy of the tiny bundle claiming fused ``top1`` and bundle ``version`` (re-manifested), and
    the evaluate metrics.json it was exported from; returns (bundle_dir, evaluation)."""
    root.mkdir(parents=True)
    bundle_dir = root / "bundle"
    shutil.copytree(tiny_bundle.bundle_dir, bundle_dir)
    evaluation = {"benchmark": BENCHMARK, "centre_clip": {"fused": {"top1": top1}}}
    meta = json.loads((bundle_dir / bundle.META).read_text())
    meta["version"] = version
    meta["metrics"]["evaluate"] = evaluation
    (bundle_dir / bundle.META).write_text(json.dumps(meta, indent=2) + "\n")
    bundle.write_manifest(bundle_dir)
    (root / "metrics.json").write_text(json.dumps(evaluation) + "\n")
    return bundle_dir, root / "metrics.json"


def _forget_tracking_uri() -> None:
    """Unset MLflow's process-wide tracking URI, which the stage sets (harmless in its own process):
    left set, it would outrank later tests' MLFLOW_TRACKING_URI when MLflow resolves models:/ URIs."""
    import mlflow

    mlflow.set_tracking_uri(None)


@pytest.fixture
def forget_tracking_uri():
    yield
    _forget_tracking_uri()


def _argv(tmp_path: Path, bundle_dir: Path, evaluation: Path, checkpoint: Path, out: Path) -> list[str]:
    params = tmp_path / "params.yaml"
    params.write_text("package:\n  alias: champion\n")
    return [
        *("--params", str(params), "--bundle-dir", str(bundle_dir), "--checkpoint", str(checkpoint)),
        *("--evaluation", str(evaluation), "--out", str(out)),
    ]


def test_inconsistent_inputs_fail_before_registering(tiny_bundle, tmp_path):
    bundle_dir, evaluation = _bundle_with_top1(tiny_bundle, tmp_path / "b", 0.5, "b1")
    checkpoint = tiny_bundle.model_path
    assert package.read_submission(bundle_dir, checkpoint, evaluation).top1 == 0.5
    with pytest.raises(package.PackageError, match="no checkpoint there"):
        package.read_submission(bundle_dir, tmp_path / "none.pt", evaluation)
    evaluation.write_text(json.dumps({"benchmark": BENCHMARK, "centre_clip": {"fused": {"top1": 0.7}}}))
    with pytest.raises(package.PackageError, match=r"exported from an evaluation with 0\.5"):
        package.read_submission(bundle_dir, checkpoint, evaluation)
    evaluation.write_text(json.dumps({"benchmark": "ntu60_xsub", "centre_clip": {"fused": {"top1": 0.5}}}))
    with pytest.raises(package.PackageError, match="on 'ntu60_xsub' but the bundle"):
        package.read_submission(bundle_dir, checkpoint, evaluation)
    evaluation.write_text(json.dumps({"benchmark": BENCHMARK}))
    with pytest.raises(package.PackageError, match=r"centre_clip\.fused\.top1 is None"):
        package.read_submission(bundle_dir, checkpoint, evaluation)


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_a_bad_bundle_or_store_fails_the_stage_with_one_line(
    tiny_bundle, tmp_path, monkeypatch, capsys, forget_tracking_uri, damage
):
    bundle_dir, evaluation = _bundle_with_top1(tiny_bundle, tmp_path / "b", 0.5, "b1")
    out = tmp_path / "package.json"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")  # cannot be created
    argv = _argv(tmp_path, bundle_dir, evaluation, tiny_bundle.model_path, out)
    assert package.main(argv) == 2
    assert "cannot open a run in the MLflow store sqlite:///" in capsys.readouterr().err
    if damage == "missing":
        shutil.rmtree(bundle_dir)
        words = "no manifest.json"
    else:
        data = bytearray((bundle_dir / "labels.json").read_bytes())
        data[3] ^= 1
        (bundle_dir / "labels.json").write_bytes(bytes(data))
        words = "checksum mismatch"
    assert package.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("package: error: ") and words in err and err.count("\n") == 1
    assert not out.exists()


# ---- registration and serving, in a temporary store ---------------------------------------------


@pytest.fixture(scope="module")
def registry(tiny_bundle, tmp_path_factory):
    """A temporary sqlite store in which the stage ran three times: top-1 0.5 (first: champion),
    0.4 (worse: candidate), 0.6 (better: champion). Returns (store uri, {version: package.json})."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    summaries = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mp.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
        mp.chdir(root)  # a new store's artifacts go to ./mlruns
        try:
            for top1, version in [(0.5, "b1"), (0.4, "b2"), (0.6, "b3")]:
                bundle_dir, evaluation = _bundle_with_top1(tiny_bundle, root / version, top1, version)
                out = root / version / "package.json"
                argv = _argv(root / version, bundle_dir, evaluation, tiny_bundle.model_path, out)
                assert package.main(argv) == 0
                summary = json.loads(out.read_text())
                summaries[summary["version"]] = summary
        finally:
            _forget_tracking_uri()
    return uri, summaries


def test_better_versions_become_champion_and_worse_stay_candidates(registry):
    import mlflow

    uri, summaries = registry
    assert [(s["status"], s["champion_before"], s["top1"]) for s in summaries.values()] == [
        ("champion", None, 0.5),
        ("candidate", 1, 0.4),
        ("champion", 1, 0.6),
    ]
    assert summaries[2]["reason"] == "top-1 0.40000 < 0.50000 of the champion (version 1) on ntu120_xsub"
    assert summaries[3]["champion_before_top1"] == 0.5 and summaries[3]["model_uri"] == f"models:/{NAME}/3"
    client = mlflow.MlflowClient(uri, uri)
    assert client.get_registered_model(NAME).aliases == {"champion": 3}
    tags = {v: client.get_model_version(NAME, str(v)).tags for v in (1, 2, 3)}
    assert [tags[v]["status"] for v in (1, 2, 3)] == ["champion", "candidate", "champion"]
    assert tags[2]["reason"] == summaries[2]["reason"]
    assert (
        tags[3]["top1"] == "0.6" and tags[3]["benchmark"] == BENCHMARK and tags[3]["bundle_version"] == "b3"
    )
    assert tags[3]["git_commit"] and tags[3]["classes"] == "8,9,50"  # the promotion rule compares it
    run = client.get_run(client.get_model_version(NAME, "3").run_id)
    assert run.data.tags["dvc_stage"] == "package" and run.data.tags["package.status"] == "champion"
    assert client.get_experiment(run.info.experiment_id).name == "ntu120-xsub"


def test_the_registered_model_has_the_onnx_signature_the_bundle_and_the_checkpoint(
    registry, tiny_bundle, tmp_path, monkeypatch
):
    import mlflow

    uri, _ = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/2", dst_path=str(tmp_path)))
    signature = mlflow.models.Model.load(local / "MLmodel").signature
    assert json.loads(signature.inputs.to_json()) == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 3, -1, 25, 2]}, "name": "joints"}
    ]
    assert json.loads(signature.outputs.to_json())[0]["tensor-spec"]["shape"] == [-1, 3]
    assert (local / "model.onnx").read_bytes() == (tiny_bundle.bundle_dir / "model.onnx").read_bytes()
    assert bundle.verify(model_loader.find_bundle(local))["version"] == "b2"
    assert (local / "checkpoint" / "model.pt").read_bytes() == tiny_bundle.model_path.read_bytes()


def test_the_server_loads_the_champion_by_alias(registry, tmp_path, monkeypatch):
    uri, summaries = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with serving(tmp_path / "nowhere", model_uri=f"models:/{NAME}@champion") as client:
        info = client.get("/v1/model").json()
    assert info["source"] == f"models:/{NAME}@champion"
    assert info["version"] == summaries[3]["bundle_version"] == "b3"  # the version the alias moved to
    assert info["metrics"]["evaluate"]["centre_clip"]["fused"]["top1"] == 0.6
