"""The train_gcn and evaluate stages on a tiny synthetic corpus: learning, resume, DDP, MLflow."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from models.ctrgcn import CTRGCN, config_for
from stages import evaluate, train_gcn, training
from stages.dataset import LoaderParams, SkeletonDataset
from stages.params import ParamsError
from stages.tracking import NullTracker

ROOT = Path(__file__).resolve().parents[1]
LOADER = LoaderParams(window=32, min_crop_frames=32, group_shards=1, cache_shards=2)


def params_doc(epochs: int = 3, **train) -> dict:
    """A full params.yaml document with a tiny recipe."""
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["train"].update(dict(workers=0, eval_every=1, device="cpu", seed=3), **train)
    doc["train"]["recipes"]["adamw"].update(batch_size=4, epochs=epochs, warmup_epochs=0.5, ema_decay=0.9)
    doc["loader"].update(window=32, min_crop_frames=32, group_shards=1, cache_shards=2)
    return doc


def load_params(doc: dict) -> train_gcn.TrainParams:
    from stages.params import from_mapping

    return from_mapping("train", train_gcn.TrainParams, doc["train"])


def test_small_model_overfits_a_handful_of_samples(tiny_features):
    ds = SkeletonDataset(
        tiny_features, stream="joint", benchmark="ntu120_xsub", split="train", params=LOADER, train=False
    )
    x = torch.stack([ds[i][0] for i in range(8)])
    y = torch.tensor([ds[i][1] for i in range(8)])
    torch.manual_seed(0)
    model = CTRGCN(config_for("small", ds.num_classes))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).all()
    assert loss.item() < 0.2


def test_training_writes_checkpoints_reports_and_learns(tiny_features, tmp_path):
    params = load_params(params_doc(epochs=6))
    tracker = NullTracker()
    metrics = train_gcn.run(
        params,
        LOADER,
        stream="joint",
        features_dir=tiny_features,
        out_dir=tmp_path / "ck",
        reports_dir=tmp_path / "rep",
        tracker=tracker,
    )
    ckpt = training.load_checkpoint(tmp_path / "ck" / "last.pt")  # weights_only=True
    assert ckpt["epoch"] == 6 and ckpt["stream"] == "joint" and ckpt["eval_weights"] == "ema"
    assert {"model", "optimizer", "ema", "rng", "config", "history"} <= set(ckpt)
    assert (tmp_path / "ck" / "best.pt").exists()
    history = (tmp_path / "rep" / "history.csv").read_text().splitlines()
    assert history[0].split(",") == list(train_gcn.HISTORY_FIELDS) and len(history) == 7
    assert [int(line.split(",")[6]) for line in history[1:]] == [
        len(
            SkeletonDataset(
                tiny_features,
                stream="joint",
                benchmark="ntu120_xsub",
                split="train",
                params=LOADER,
                train=True,
            )
        )
        // 4
        * 4
    ] * 6
    losses = [float(line.split(",")[2]) for line in history[1:]]
    assert losses[-1] < losses[0]
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["test_top1"] == metrics["test_top1"] and metrics["test_top1"] > 0.8  # 3 classes
    assert tracker.params["stream"] == "joint" and len([m for m in tracker.metrics if m[0]]) == 6


def run_cli(params_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "stages.train_gcn",
        "--params",
        str(params_path),
        "--stream",
        "joint",
        "--features-dir",
        str(pytest.tiny_features),
        "--out-dir",
        str(out / "ck"),
        "--reports-dir",
        str(out / "rep"),
        "--no-mlflow",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_killed_run_resumes_to_the_same_weights(tiny_features, tmp_path):
    pytest.tiny_features = tiny_features
    params_path = tmp_path / "params.yaml"
    # dropout draws from torch's global stream, and one loader process has a persistent iterator,
    # which a resumed run starts again: with the loader's seed drawn from that stream, the two
    # runs' dropout masks parted after the kill (224 tensors differed)
    params_path.write_text(yaml.safe_dump(params_doc(epochs=4, eval_every=2, dropout=0.2, workers=1)))
    whole = run_cli(params_path, tmp_path / "whole")
    assert whole.wait(300) == 0, whole.stdout.read()

    killed = run_cli(params_path, tmp_path / "killed")
    last = tmp_path / "killed" / "ck" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline:
        if last.exists() and training.load_checkpoint(last)["epoch"] >= 2:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    killed.wait(60)
    stopped_at = training.load_checkpoint(last)["epoch"]
    assert killed.returncode == -signal.SIGKILL and stopped_at < 4

    resumed = run_cli(params_path, tmp_path / "killed", "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"resuming joint from epoch {stopped_at}" in output
    a = training.load_checkpoint(tmp_path / "whole" / "ck" / "last.pt")
    b = training.load_checkpoint(last)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]


def _stage_dirs(features_dir: Path, tmp_path: Path) -> dict:
    """train_gcn.run's keywords for the joint stream, its outputs under ``tmp_path``."""
    return dict(
        stream="joint", features_dir=features_dir, out_dir=tmp_path / "ck", reports_dir=tmp_path / "rep"
    )


def _killed_after(when):
    """``training.save_checkpoint`` that is killed (KeyboardInterrupt) right after writing a
    checkpoint ``when(path, payload)`` picks."""
    save = training.save_checkpoint

    def saving(path, payload):
        save(path, payload)
        if when(path, payload):
            raise KeyboardInterrupt

    return saving


def test_ctrl_c_says_where_to_go_on_from_instead_of_a_traceback(tiny_features, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or dvc repro's) printed a KeyboardInterrupt traceback. The stage now exits 130 naming
    the checkpoint a --resume goes on from, or saying no epoch finished."""
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params_doc(epochs=2)))
    kw = _stage_dirs(tiny_features, tmp_path)
    argv = ["--params", str(params_path), "--stream", "joint", "--features-dir", str(tiny_features),
            "--out-dir", str(kw["out_dir"]), "--reports-dir", str(kw["reports_dir"]),
            "--no-mlflow"]  # fmt: skip

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train_gcn, "prepare", stop)
        assert train_gcn.main(argv) == 130
    assert capsys.readouterr().err.strip() == (
        f"train_gcn@joint: interrupted; no epoch finished (no {kw['out_dir'] / 'last.pt'})"
    )
    with monkeypatch.context() as m:
        m.setattr(training, "save_checkpoint", _killed_after(lambda path, p: path.name == "last.pt"))
        assert train_gcn.main(argv) == 130
    last = kw["out_dir"] / "last.pt"
    said = capsys.readouterr().err.strip()
    assert said.endswith(
        f"train_gcn@joint: interrupted; {last} holds the last finished epoch: the same command with "
        "--resume goes on from it"
    )
    assert train_gcn.main([*argv, "--resume"]) == 0 and training.load_checkpoint(last)["epoch"] == 2


def test_an_improving_epoch_writes_best_before_last(tiny_features, tmp_path, monkeypatch):
    """Killed between its two writes, an epoch that improved left a last.pt naming a best epoch that
    best.pt did not hold, and the resumed run never wrote it (a training audit). best.pt goes first
    now: killed in between, the resume redoes that epoch from the previous last.pt."""
    saved, save = [], training.save_checkpoint
    monkeypatch.setattr(
        training,
        "save_checkpoint",
        lambda path, payload: (saved.append((path.name, payload["epoch"])), save(path, payload)),
    )
    kw = _stage_dirs(tiny_features, tmp_path)
    train_gcn.run(load_params(params_doc(epochs=2)), LOADER, **kw)
    improved = [epoch for name, epoch in saved if name == "best.pt"]
    assert improved and improved[0] == 1  # the first tested epoch is the best so far
    for epoch in improved:
        assert saved.index(("best.pt", epoch)) + 1 == saved.index(("last.pt", epoch))
    best = training.load_checkpoint(tmp_path / "ck" / "best.pt")
    assert best["epoch"] == json.loads((tmp_path / "rep" / "metrics.json").read_text())["best_epoch"]


def test_resume_refuses_a_checkpoint_of_other_params(tiny_features, tmp_path, monkeypatch):
    """The refusal names the keys that differ (the checkpoint stores its resolved config; one from
    before that still resumes, and is refused without the list)."""
    params = load_params(params_doc(epochs=2))
    kw = _stage_dirs(tiny_features, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(training, "save_checkpoint", _killed_after(lambda path, payload: path.name == "last.pt"))
        with pytest.raises(KeyboardInterrupt):
            train_gcn.run(params, LOADER, **kw)
    other = dataclasses.replace(params, seed=99)
    with pytest.raises(ValueError, match=r"other parameters \(train\.seed: 3 there, 99 now\); delete it"):
        train_gcn.run(other, LOADER, resume=True, **kw)
    last = tmp_path / "ck" / "last.pt"
    old = training.load_checkpoint(last)
    del old["resolved"]  # as written before the resolved config was stored
    training.save_checkpoint(last, old)
    with pytest.raises(ValueError, match="predates the stored configuration"):
        train_gcn.run(other, LOADER, resume=True, **kw)
    train_gcn.run(params, LOADER, resume=True, **kw)  # the old checkpoint of the same run resumes
    assert training.load_checkpoint(last)["epoch"] == 2


def test_reports_are_replaced_whole_or_left_as_they_were(tiny_features, tmp_path, monkeypatch):
    """metrics.json (a DVC metrics file) and config.yaml were written in place: a run killed while
    writing them left half a file. They are written beside and renamed, like the checkpoints."""
    params = load_params(params_doc(epochs=1))
    kw = _stage_dirs(tiny_features, tmp_path)
    train_gcn.run(params, LOADER, **kw)
    write_text = Path.write_text
    for report in (tmp_path / "rep" / "metrics.json", tmp_path / "ck" / "config.yaml"):
        before = report.read_bytes()

        def killed_writing(self, text, *args, _name=report.name, **kwargs):
            if self.name != _name:
                return write_text(self, text, *args, **kwargs)
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(Path, "write_text", killed_writing)
            with pytest.raises(KeyboardInterrupt):  # no epoch left: straight to the reports
                train_gcn.run(params, LOADER, resume=True, **kw)
        assert report.read_bytes() == before, report.name


def cli_args(params_path: Path, features_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--params", str(params_path), "--stream", "joint", "--features-dir", str(features_dir),
            "--out-dir", str(out / "ck"), "--reports-dir", str(out / "rep"), *extra]  # fmt: skip


def test_an_unreadable_checkpoint_is_refused_with_its_path(tiny_features, tmp_path, capsys):
    """A truncated last.pt (a disk that filled up, a copy cut short) gave a raw traceback that did not
    name the file; it is refused like a checkpoint of other parameters (exit 2, what to do)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_doc(epochs=1)))
    last = tmp_path / "ck" / "last.pt"
    last.parent.mkdir()
    for content in (b"abc", b"PK\x03\x04" + bytes(100)):
        last.write_bytes(content)
        args = cli_args(tmp_path / "params.yaml", tiny_features, tmp_path, "--resume", "--no-mlflow")
        assert train_gcn.main(args) == 2
        err = capsys.readouterr().err
        assert f"{last} cannot be read (" in err and "delete it or run without --resume" in err
    assert last.read_bytes() == content  # left for the user to look at


def test_a_refused_resume_leaves_the_mlflow_run_as_it_was(tiny_features, tmp_path, monkeypatch, capsys):
    """A --resume refused for other parameters first reopened the checkpoint's MLflow run, then failed
    in it: the finished run turned FAILED and its git_commit tag was rewritten. The check comes first."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_doc(epochs=1)))
    args = cli_args(tmp_path / "params.yaml", tiny_features, tmp_path)
    assert train_gcn.main(args) == 0
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (before,) = client.search_runs([client.get_experiment_by_name("ntu120-xsub").experiment_id])
    client.set_tag(before.info.run_id, "git_commit", "abc123")  # the commit that trained it
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_doc(epochs=1, seed=99)))
    code = train_gcn.main([*args, "--resume"])
    after = client.get_run(before.info.run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.tags["git_commit"] == "abc123"
    assert code == 2 and "train.seed: 3 there, 99 now" in capsys.readouterr().err


def test_resume_after_the_last_checkpoint_completes_reports_and_logging(tiny_features, tmp_path, monkeypatch):
    """Killed after the last epoch's last.pt, the resumed run had no epoch left: history.csv lacked the
    last row and the tracker never got that epoch. Now history.csv is written from the checkpoint and
    the tracker gets what it lacks, once; the final metric is not logged again by a second resume."""
    params = load_params(params_doc(epochs=2))
    kw = _stage_dirs(tiny_features, tmp_path)
    tracker = NullTracker()  # stands for the MLflow run: it keeps what it was given
    last_of_2 = _killed_after(lambda path, payload: path.name == "last.pt" and payload["epoch"] == 2)
    with monkeypatch.context() as m:
        m.setattr(training, "save_checkpoint", last_of_2)
        with pytest.raises(KeyboardInterrupt):
            train_gcn.run(params, LOADER, tracker=tracker, **kw)
    assert [step for step, _ in tracker.metrics] == [1]
    assert len((tmp_path / "rep" / "history.csv").read_text().splitlines()) == 2  # header, epoch 1
    metrics = train_gcn.run(params, LOADER, resume=True, tracker=tracker, **kw)
    history = (tmp_path / "rep" / "history.csv").read_text().splitlines()
    assert len(history) == 3 and history[2].startswith("2,")
    assert [step for step, _ in tracker.metrics] == [1, 2, None]  # epoch 2 once, then the final one
    saved = training.load_checkpoint(tmp_path / "ck" / "last.pt")["history"]
    assert tracker.metrics[1][1]["train_loss"] == saved[1]["train_loss"]
    assert train_gcn.run(params, LOADER, resume=True, tracker=tracker, **kw) == metrics
    assert [step for step, _ in tracker.metrics] == [1, 2, None]  # nothing logged twice


def test_bad_params_fail_with_a_message(tmp_path, capsys):
    doc = params_doc()
    doc["train"]["streams"] = ["joint", "velocity"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    code = train_gcn.main(
        [
            "--params",
            str(tmp_path / "params.yaml"),
            "--stream",
            "joint",
            "--features-dir",
            "x",
            "--out-dir",
            str(tmp_path / "o"),
            "--reports-dir",
            str(tmp_path / "r"),
            "--no-mlflow",
        ]
    )
    assert code == 2 and "streams" in capsys.readouterr().err


def test_mlflow_logs_params_metrics_and_artifacts(tiny_features, tmp_path, monkeypatch):
    import mlflow

    doc = params_doc(epochs=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    code = train_gcn.main(
        [
            "--params",
            "params.yaml",
            "--stream",
            "joint",
            "--features-dir",
            str(tiny_features),
            "--out-dir",
            "ck",
            "--reports-dir",
            "rep",
        ]
    )
    assert code == 0
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("ntu120-xsub")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["train.recipe"] == "adamw" and run.data.params["stream"] == "joint"
    assert run.data.tags["dvc_stage"] == "train_gcn@joint" and run.data.tags["git_commit"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/last.pt"}


def test_a_resumed_run_goes_on_logging_into_its_mlflow_run(tiny_features, tmp_path, monkeypatch):
    """Killed after epoch 1 and resumed, the stage logged into a second run (epoch 2 only) and left the
    first FAILED or, SIGKILLed, RUNNING: the checkpoint names its run, and --resume reopens it."""
    import mlflow

    from stages import tracking

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_doc(epochs=2)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    args = ["--params", "params.yaml", "--stream", "joint", "--features-dir", str(tiny_features),
            "--out-dir", "ck", "--reports-dir", "rep"]  # fmt: skip
    log_metrics = tracking.MlflowTracker.log_metrics

    def killed_after_epoch_1(self, metrics, step=None):
        log_metrics(self, metrics, step)
        if step == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tracking.MlflowTracker, "log_metrics", killed_after_epoch_1)
        assert train_gcn.main(args) == 130  # stopped, as Ctrl-C stops it
    assert train_gcn.main([*args, "--resume"]) == 0
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("ntu120-xsub").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert training.load_checkpoint(tmp_path / "ck" / "last.pt")["mlflow_run_id"] == run.info.run_id


def test_resuming_into_a_deleted_mlflow_run_starts_a_new_one(tmp_path, monkeypatch):
    """``start_run`` refuses a deleted run (in the UI's trash), and the resumed stage went on with no
    tracking at all. A deleted run is treated like a missing one."""
    import mlflow

    from stages import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with tracking.mlflow_run("ntu120_xsub", "train_gcn@joint", "train_gcn@joint") as first:
        first.log_metrics({"train_loss": 1.0}, step=1)
    client = mlflow.MlflowClient(uri)
    client.delete_run(first.run_id)
    with tracking.mlflow_run("ntu120_xsub", "train_gcn@joint", "train_gcn@joint", first.run_id) as tracker:
        assert isinstance(tracker, tracking.MlflowTracker) and tracker.run_id not in (None, first.run_id)
        assert tracker.metric_steps("train_loss") == set()  # a fresh run: the epochs go in again
        tracker.log_metrics({"train_loss": 0.5}, step=1)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert client.get_run(first.run_id).info.lifecycle_stage == "deleted"


def test_an_mlflow_store_that_cannot_be_opened_does_not_stop_a_stage(tmp_path, monkeypatch, capsys):
    """The module promises it; a store unreachable at the start raised out of the stage (rc 1 with a
    traceback, the orchestration audit). Only the package stage, whose job is the registry, fails."""
    from stages import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with tracking.mlflow_run("ntu120_xsub", "evaluate", "evaluate") as tracker:
        assert isinstance(tracker, tracking.NullTracker) and tracker.run_id is None
    assert "MLflow tracking is unavailable" in capsys.readouterr().err
    with (
        pytest.raises(Exception, match=r"127\.0\.0\.1"),
        tracking.mlflow_run("ntu120_xsub", "p", "p", required=True),
    ):
        pass


def test_mlflow_tracker_renames_what_mlflow_refuses(tmp_path, monkeypatch):
    """MLflow rejects a whole batch over one name with ``@`` (the pose stages' ``pck@0.2``): the
    tracker logs it as ``pck_0.2``, with the rest of the batch."""
    import mlflow

    from stages.tracking import mlflow_name, mlflow_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    with mlflow_run("ntu120_xsub", "names", "train_pose") as tracker:
        tracker.log_params({"loss": {"joints3d@m": 10.0}})
        tracker.log_metrics({"pck@0.2": 0.8, "mpjpe_mm": 130.0, "det recall/IoU:0.5": 0.7}, step=1)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("ntu120-xsub").experiment_id])
    assert run.data.metrics == {"pck_0.2": 0.8, "mpjpe_mm": 130.0, "det recall/IoU:0.5": 0.7}
    assert run.data.params == {"loss.joints3d_m": "10.0"}
    assert mlflow_name("a@b#c") == "a_b_c"


def test_evaluate_reports_streams_fusion_and_confusions(tiny_features, tmp_path, monkeypatch):
    doc = params_doc(epochs=3)
    params = load_params(doc)
    for stream in ("joint", "bone"):
        train_gcn.run(
            params,
            LOADER,
            stream=stream,
            features_dir=tiny_features,
            out_dir=tmp_path / "ck" / stream,
            reports_dir=tmp_path / "rep" / stream,
        )
    eparams = evaluate.EvaluateParams(multi_clips=2, batch_size=16, workers=0)
    with pytest.raises(ParamsError, match=r"no weight for the trained stream\(s\) \['bone'\]"):
        evaluate.run(
            dataclasses.replace(eparams, fusion_weights={"joint": 0.6}), params, LOADER,
            features_dir=tiny_features, checkpoints_dir=tmp_path / "ck", out_dir=tmp_path / "ev1",
        )  # fmt: skip
    assert not (tmp_path / "ev1").exists()
    metrics = evaluate.run(
        eparams,
        params,
        LOADER,
        features_dir=tiny_features,
        checkpoints_dir=tmp_path / "ck",
        out_dir=tmp_path / "ev",
    )
    out = tmp_path / "ev"
    assert set(metrics["centre_clip"]) == {"fused", "joint", "bone"}
    assert set(metrics["uniform_2_clips"]) == {"fused", "joint", "bone"}
    assert "A008_A009" in metrics["pairs"]
    rows = (out / "confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) - 1 == metrics["test_samples"]
    accuracy = np.mean([a == p for a, p in (r.split(",") for r in rows[1:])])
    assert accuracy == pytest.approx(metrics["centre_clip"]["fused"]["top1"], abs=1e-4)
    assert (out / "confusion.png").stat().st_size > 1000
    model_file = torch.load(out / "model.pt", weights_only=True)
    assert model_file["streams"] == ["joint", "bone"] and model_file["weights"] == {"joint": 0.6, "bone": 0.6}

    # Killed while writing model.pt (export's input), a rerun left half of it; it is replaced whole now
    whole = (out / "model.pt").read_bytes()

    def dies_half_way(obj, f):
        Path(f).write_bytes(whole[: len(whole) // 2])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(torch, "save", dies_half_way)
        with pytest.raises(KeyboardInterrupt):
            evaluate.run(
                dataclasses.replace(eparams, multi_clips=0), params, LOADER,
                features_dir=tiny_features, checkpoints_dir=tmp_path / "ck", out_dir=out,
            )  # fmt: skip
    assert (out / "model.pt").read_bytes() == whole

    # The learned fusions fit on the streams' outputs (they crashed on inference tensors before)
    for fusion in ("concat", "attention"):
        fused = evaluate.run(
            dataclasses.replace(eparams, fusion=fusion, multi_clips=0), params, LOADER,
            features_dir=tiny_features, checkpoints_dir=tmp_path / "ck", out_dir=tmp_path / fusion,
        )  # fmt: skip
        assert fused["fusion"] == fusion and 0 <= fused["centre_clip"]["fused"]["top1"] <= 1

    # Multi-clip sampling (what a bundle with it serves): each clip fused, the clips' probabilities
    # averaged, as the server's score_summary does (evaluate used to fuse each stream's averaged clips)
    from serving.service import score_summary

    uniform = dataclasses.replace(LOADER, sampling="uniform", test_clips=3)
    served = evaluate.run(
        dataclasses.replace(eparams, multi_clips=0), params, uniform,
        features_dir=tiny_features, checkpoints_dir=tmp_path / "ck", out_dir=tmp_path / "ev3",
    )  # fmt: skip
    ckpts = evaluate.load_streams(tmp_path / "ck", ("joint", "bone"), "last")
    fused_model = evaluate.build_model(ckpts, "sum", eparams.fusion_weights)
    names = ckpts["joint"]["class_names"]
    label_map = [{"index": k, "id": k, "name": n} for k, n in enumerate(names)]
    test = SkeletonDataset(
        tiny_features, stream="joint", benchmark="ntu120_xsub", split="test", params=uniform, train=False
    )
    with torch.no_grad():
        tops = [score_summary(fused_model(x).numpy(), label_map, 1, 0, 0.0)["top"][0] for x, _ in test]
    predicted = [r.split(",")[1] for r in (tmp_path / "ev3" / "confusion.csv").read_text().splitlines()[1:]]
    assert predicted == [t["name"] for t in tops]
    accuracy = np.mean([t["index"] == y for t, (_, y) in zip(tops, test, strict=True)])
    assert served["centre_clip"]["fused"]["top1"] == pytest.approx(accuracy, abs=1e-4)

    # The parse stage's denoise mode, when not the default, reaches model.pt through the stores'
    # attributes (export checks it against parse.denoise); the default writes no key, as before
    assert "denoise" not in model_file
    marked = tmp_path / "marked"
    shutil.copytree(tiny_features, marked)
    zarr.open_group(str(marked / "features.zarr"), mode="r+").attrs["denoise"] = "reference"
    evaluate.run(dataclasses.replace(eparams, multi_clips=0), params, LOADER, features_dir=marked,
                 checkpoints_dir=tmp_path / "ck", out_dir=tmp_path / "evr")  # fmt: skip
    assert torch.load(tmp_path / "evr" / "model.pt", weights_only=True)["denoise"] == "reference"

    # A test split without the pair's classes: no pair accuracy (NaN is not JSON), blank per-class
    # cells; an empty test split: a message before any work, in evaluate and in train_gcn
    only50 = _with_test_split(tiny_features, tmp_path / "only50", lambda action: action == 50)
    evaluate.run(eparams, params, LOADER, features_dir=only50, checkpoints_dir=tmp_path / "ck",
                 out_dir=tmp_path / "ev50")  # fmt: skip
    strict = json.loads((tmp_path / "ev50" / "metrics.json").read_text(), parse_constant=pytest.fail)
    assert strict["pairs"] == {} and strict["test_samples"] > 0  # class 50's test samples only
    per_class = (tmp_path / "ev50" / "per_class.csv").read_text().splitlines()
    assert per_class[1].startswith("A008,sitting down,0,") and per_class[1].endswith(",")
    empty = _with_test_split(tiny_features, tmp_path / "notest", lambda action: False)
    with pytest.raises(ValueError, match="the test split of ntu120_xsub is empty"):
        evaluate.run(eparams, params, LOADER, features_dir=empty, checkpoints_dir=tmp_path / "ck",
                     out_dir=tmp_path / "ev0")  # fmt: skip
    with pytest.raises(ValueError, match="the test split of ntu120_xsub is empty"):
        train_gcn.run(params, LOADER, stream="joint", features_dir=empty, out_dir=tmp_path / "ck0",
                      reports_dir=tmp_path / "rep0")  # fmt: skip
    assert not (tmp_path / "ck0" / "last.pt").exists()  # refused before the first epoch


def _with_test_split(features_dir: Path, copy: Path, keep) -> Path:
    """A copy of a features store whose X-Sub test split keeps only the samples of actions ``keep``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(features_dir, copy)
    table = pq.read_table(copy / "samples.parquet")
    split = [
        s if s != "test" or keep(a) else None
        for s, a in zip(table["ntu120_xsub"].to_pylist(), table["action"].to_pylist(), strict=True)
    ]
    index = table.schema.get_field_index("ntu120_xsub")
    pq.write_table(
        table.set_column(index, "ntu120_xsub", pa.array(split, pa.string())), copy / "samples.parquet"
    )
    return copy


@pytest.mark.parametrize(
    ("weights", "streams", "phrase"),
    [
        ({"joint": float("nan"), "bone": 0.6}, None, "finite and >= 0"),
        ({"joint": -0.6, "bone": 0.6}, None, "finite and >= 0"),
        ({"jiont": 0.6}, None, "unknown stream(s) ['jiont']"),
        ({"joint": 0.6}, ("joint", "bone"), "no weight for the trained stream(s) ['bone']"),
        ({"joint": 0.0, "bone": 0.0, "joint_motion": 1.0}, ("joint", "bone"), "all zero"),
    ],
)
def test_fusion_weights_are_checked(weights, streams, phrase):
    with pytest.raises(ParamsError) as info:
        eparams = evaluate.EvaluateParams(fusion_weights=weights)
        eparams.validate()
        eparams.check_streams(streams)
    assert phrase in str(info.value)
    evaluate.EvaluateParams(fusion="concat", fusion_weights={}).check_streams(("joint", "bone"))  # unused


def test_clips_are_fused_one_by_one_then_averaged_as_the_server_does():
    """A sample's clips: the fused score of each, their probabilities averaged (the server's
    score_summary), not each stream's clips averaged and then fused (pyskl's ensemble), which can
    name another class: evaluate's figure for a multi-clip bundle is the served model's."""
    from models.ctrgcn import config_for
    from models.two_stream import MultiStream
    from serving.service import score_summary

    configs = {n: config_for("small", num_classes=3) for n in ("joint", "bone")}
    model = MultiStream(configs, fusion="sum", weights={"joint": 0.6, "bone": 0.6}).eval()
    scores = torch.tensor(
        [[[-3.4, 4.4, -4.3], [0.5, -2.3, 1.5]], [[-3.6, -6.0, 1.5], [5.8, 3.8, 3.1]]]
    )  # 2 streams x 2 clips of one sample x 3 classes
    fused, per_stream = evaluate.fuse_clips(model, scores, torch.zeros(2, 1), clips=2)
    labels = [{"index": k, "id": k, "name": str(k)} for k in range(3)]
    served = score_summary((0.6 * scores.sum(0)).numpy(), labels, 3, 0, 0.0)
    np.testing.assert_allclose(torch.softmax(fused[0], 0).numpy(), served["probabilities"], atol=1e-6)
    pyskl = 0.6 * training.average_clips(scores, 2).sum(0)[0]
    assert int(fused[0].argmax()) == 0 != int(pyskl.argmax())  # the two rules disagree here
    np.testing.assert_allclose(per_stream.numpy(), training.average_clips(scores, 2).numpy())
    one, _ = evaluate.fuse_clips(model, scores[:, :1], torch.zeros(1, 1), clips=1)
    np.testing.assert_allclose(one.numpy(), 0.6 * scores[:, :1].sum(0).numpy(), atol=1e-6)


def test_confusion_summaries_on_known_predictions():
    labels = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0, 2])
    cm = evaluate.confusion_matrix(pred, labels, 3)
    assert cm.tolist() == [[1, 2, 0], [1, 1, 0], [0, 0, 1]]
    top = evaluate.most_confused(cm, ["a", "b", "c"], 5)
    assert top == [
        {"true": "a", "predicted": "b", "count": 2, "share": 0.6667},
        {"true": "b", "predicted": "a", "count": 1, "share": 0.5},
    ]


def test_ranks_must_resume_from_the_same_checkpoint():
    """With node-local disks each rank read its own last.pt (or none) and resumed silently from its
    own epoch. The ranks compare what they found and all stop, with each rank's view."""
    path = Path("ck/last.pt")
    ckpt = (3, 96, "f00d")
    views = [{"host": f"node{r}", "problem": None, "checkpoint": ckpt} for r in range(2)]
    assert train_gcn.resume_disagreement(path, views) is None
    views[1]["checkpoint"] = None  # rank 1's node has no last.pt
    message = train_gcn.resume_disagreement(path, views)
    assert "rank 0 (node0) epoch 3, rank 1 (node1) no checkpoint" in message
    assert "a filesystem every node shares" in message
    views[1]["checkpoint"] = (2, 64, "f00d")  # an older copy
    assert "rank 1 (node1) epoch 2" in train_gcn.resume_disagreement(path, views)
    views[1]["problem"] = "ck/last.pt cannot be read (EOFError: ); delete it or run without --resume"
    assert train_gcn.resume_disagreement(path, views).startswith("rank 1 (node1): ck/last.pt cannot be read")
    assert train_gcn.resume_disagreement(path, views[1:]) == views[1]["problem"]  # one process: as is


def test_batch_size_is_the_global_batch_under_ddp(tiny_features):
    """torchrun with N processes trained with N x batch_size per step (batch_size was per rank, the
    learning rate unscaled). batch_size is the global batch now; each rank takes its share."""
    params = load_params(params_doc())  # batch_size 4

    def rank_batch(world_size: int, rank: int = 0) -> int:
        rt = training.Runtime(torch.device("cpu"), None, False, rank=rank, world_size=world_size)
        _, train_loader, _ = train_gcn._loaders(tiny_features, "joint", params, LOADER, rt)
        return train_loader.batch_sampler.batch_size

    assert rank_batch(1) == 4 and rank_batch(2) == rank_batch(2, rank=1) == 2 and rank_batch(4) == 1
    with pytest.raises(ParamsError, match=r"batch_size 4 is the global batch.*use a multiple of 3"):
        rank_batch(3)


def test_loaders_pin_memory_only_for_cuda_runs(tiny_features, monkeypatch):
    """A device=cpu run on a machine with a GPU pinned every batch (page-locked host memory for copies
    that never happen); pinning follows the training device, as in train_pose."""
    from stages.dataset import make_loader

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    params = load_params(params_doc())
    ds = SkeletonDataset(
        tiny_features, stream="joint", benchmark="ntu120_xsub", split="test", params=LOADER, train=False
    )
    assert not make_loader(ds, 4, shuffle=False, num_workers=0).pin_memory
    for device, pinned in (("cpu", False), ("cuda", True)):
        rt = training.Runtime(torch.device(device), None, False)
        loaders = train_gcn._loaders(tiny_features, "joint", params, LOADER, rt)[1:]
        assert [loader.pin_memory for loader in loaders] == [pinned, pinned]


@pytest.mark.slow
def test_ddp_with_two_gloo_processes(tiny_features, tmp_path):
    doc = params_doc(epochs=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "stages.train_gcn",
        "--params",
        str(tmp_path / "params.yaml"),
        "--stream",
        "joint",
        "--features-dir",
        str(tiny_features),
        "--out-dir",
        str(tmp_path / "ck"),
        "--reports-dir",
        str(tmp_path / "rep"),
        "--no-mlflow",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "x2" in done.stdout  # the banner names the world size
    ckpt = training.load_checkpoint(tmp_path / "ck" / "last.pt")
    assert ckpt["resolved"]["batch_per_rank"] == 2  # in the fingerprint: per-rank-batch checkpoints differ
    train_samples = len(
        SkeletonDataset(
            tiny_features, stream="joint", benchmark="ntu120_xsub", split="train", params=LOADER, train=True
        )
    )
    per_epoch = ckpt["history"][0]
    # batch_size 4 is the global batch: each of the 2 ranks takes whole batches of 2 from its half;
    # the epoch statistics cover both ranks
    assert "x2 (2 per batch each)" in done.stdout
    assert per_epoch["train_top1"] is not None and ckpt["epoch"] == 2
    assert per_epoch["samples"] == (train_samples // 2) // 2 * 2 * 2
    # each rank's RNG states (its own dropout stream; rank 0's is the single-process one)
    ranks = ckpt["rank_rng"]
    assert len(ranks) == 2 and torch.equal(ranks[0]["torch"], ckpt["rng"]["torch"])
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
