"""The video path's own action model: the training videos' estimated skeletons (``video_skeletons``),
the fine-tune on them (``finetune_video``), its export, and the service choosing it for videos."""

from __future__ import annotations

import dataclasses
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from serving import model as model_loader
from serving import video, video_actions
from serving.pose_runtime import PoseRuntime
from stages import export, finetune_video, ntu_files, training, video_skeletons
from stages.dataset import LoaderParams
from stages.features import FeaturesParams
from stages.preprocess import joints_from_skeleton_file
from tests.pose_helpers import pose_export, stick_figure_frames, write_video
from tests.serving_helpers import serving, settings_for

FRAMES = 24


def _half(path: Path) -> str:
    return ntu_files.split_membership(ntu_files.parse_name(path.stem))["ntu120_xsub"]


@pytest.fixture(scope="module")
def corpus(tiny_bundle, tmp_path_factory):
    """Stick-figure videos named after 3 training-half and 2 test-half files of the tiny corpus, and
    a training-half video that is not a video (the stage must reject it and go on)."""
    root = tmp_path_factory.mktemp("video_corpus")
    skeletons = sorted((tiny_bundle.features_dir.parent / "raw").rglob("*.skeleton"))
    train = [p for p in skeletons if _half(p) == "train"]
    test = [p for p in skeletons if _half(p) == "test"]
    picked = train[:3] + test[:2]
    videos = root / "videos"
    videos.mkdir()
    for i, path in enumerate(picked):  # each its own walk: slower and slower, every other one leftwards
        frames = stick_figure_frames(FRAMES + 8 * i)
        write_video(videos / f"{path.stem}_rgb.avi", frames[::-1] if i % 2 else frames)
    broken = train[3]
    (videos / f"{broken.stem}_rgb.avi").write_bytes(b"\x00not a video" * 64)
    return types.SimpleNamespace(
        videos=videos,
        skeletons=tiny_bundle.features_dir.parent / "raw",
        train=[p.stem for p in train[:3]],
        broken=broken.stem,
        test=[p.stem for p in test[:2]],
        files={p.stem: p for p in [*picked, broken]},
    )


@pytest.fixture(scope="module")
def estimated(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("video_skeletons")
    params = video_skeletons.VideoSkeletonsParams(workers=1)
    summary = video_skeletons.run(
        params,
        video_dir=corpus.videos,
        skeleton_dir=corpus.skeletons,
        pose_dir=pose_export(tmp_path_factory).dir,
        out_dir=out / "skeletons",
        summary_path=out / "summary.json",
    )
    return types.SimpleNamespace(dir=out / "skeletons", summary=summary, summary_path=out / "summary.json")


def test_training_videos_only_through_the_video_path_and_a_bad_video_is_rejected(
    corpus, estimated, tmp_path_factory
):
    data = video_skeletons.load(estimated.dir)
    mirrored = [f"{name}/mirrored" for name in corpus.train]  # each video also flipped left to right
    assert data["estimated"]["names"] == [*corpus.train, *mirrored]  # the held-out performers' stay out
    assert data["true"]["names"] == sorted([*corpus.train, corpus.broken])  # its file is still good
    summary = estimated.summary
    assert (summary["videos"], summary["estimated_samples"], summary["true_samples"]) == (4, 3, 4)
    assert summary["mirrored_samples"] == 3
    (rejection,) = summary["rejections"]
    assert rejection["name"] == corpus.broken and rejection["reason"].startswith("video unreadable_video")
    assert json.loads(estimated.summary_path.read_text())["rejected"] == 1
    runtime = PoseRuntime.load(pose_export(tmp_path_factory).dir)
    for i, name in enumerate(corpus.train):
        action = ntu_files.parse_name(name).action
        assert (
            data["estimated"]["actions"][i]
            == data["true"]["actions"][data["true"]["names"].index(name)]
            == action
        )
        path = corpus.videos / f"{name}_rgb.avi"
        for k, mirror in ((i, False), (len(corpus.train) + i, True)):
            assert data["estimated"]["actions"][k] == action
            _, skeleton = video.skeleton_from_file(path, runtime, mirror=mirror)
            want = video_actions.window_joints(skeleton.joints, 0, skeleton.frames)
            np.testing.assert_array_equal(data["estimated"]["joints"][k], want)
        true = joints_from_skeleton_file(corpus.files[name].read_bytes())
        np.testing.assert_array_equal(data["true"]["joints"][data["true"]["names"].index(name)], true)


def test_worker_processes_give_the_same_store(corpus, estimated, tmp_path, tmp_path_factory):
    video_skeletons.run(
        video_skeletons.VideoSkeletonsParams(workers=2),
        video_dir=corpus.videos,
        skeleton_dir=corpus.skeletons,
        pose_dir=pose_export(tmp_path_factory).dir,
        out_dir=tmp_path / "two",
    )
    with (
        np.load(estimated.dir / video_skeletons.FILE) as one,
        np.load(tmp_path / "two" / video_skeletons.FILE) as two,
    ):
        assert sorted(one.files) == sorted(two.files)
        for key in one.files:
            if one[key].dtype.kind == "f":
                np.testing.assert_allclose(one[key], two[key], atol=1e-5)
            else:
                np.testing.assert_array_equal(one[key], two[key])


def test_stage_errors_are_clear(corpus, tmp_path, tmp_path_factory, capsys):
    pose_dir = pose_export(tmp_path_factory).dir
    params = tmp_path / "params.yaml"
    params.write_text("video_skeletons:\n  workers: 1\n")
    base = [
        "--params",
        str(params),
        "--skeleton-dir",
        str(corpus.skeletons),
        "--out-dir",
        str(tmp_path / "o"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert video_skeletons.main([*base, "--video-dir", str(empty), "--pose-dir", str(pose_dir)]) == 2
    assert "no ntu120_xsub training-split video" in capsys.readouterr().err
    assert video_skeletons.main([*base, "--video-dir", str(corpus.videos), "--pose-dir", str(tmp_path)]) == 2
    assert "pose.json" in capsys.readouterr().err
    params.write_text("video_skeletons:\n  threshold: 2\n")
    assert video_skeletons.main([*base, "--video-dir", str(corpus.videos), "--pose-dir", str(pose_dir)]) == 2
    assert "threshold" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_training_samples_are_normalised_labelled_and_skip_unknown_classes(estimated, tiny_bundle):
    data = video_skeletons.load(estimated.dir)
    meta = export.load_fused(tiny_bundle.model_path)[1]
    ids = list(meta["class_ids"])
    xs, ys, from_video = finetune_video.training_samples(data, ids, True, False)
    assert len(xs) == 10 and from_video.sum() == 6 and len(ys) == 10  # 3 videos, 3 mirrored, 4 files
    want = [ids.index(int(a)) for a in [*data["estimated"]["actions"], *data["true"]["actions"]]]
    assert ys.tolist() == want
    # centred as the features stage centres: actor 1's spine-middle of the first frame at the origin
    assert all(np.abs(x[:, 0, 1, 0]).max() < 1e-6 for x in xs)
    only_video, _, flags = finetune_video.training_samples(data, ids, False, False)
    assert len(only_video) == 6 and flags.all()
    assert finetune_video.training_samples(data, [999], True, False)[0] == []


def _recipe(epochs: int = 2, batch_size: int = 4, lr: float = 0.05) -> training.Recipe:
    return training.Recipe(optimizer="sgd", lr=lr, weight_decay=0.0, batch_size=batch_size, epochs=epochs)


@pytest.fixture(scope="module")
def finetuned(estimated, tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    params = finetune_video.FinetuneVideoParams(recipe=_recipe(), eval_batch_size=16)
    metrics = finetune_video.run(
        params,
        LoaderParams(),
        FeaturesParams(),
        model_path=tiny_bundle.model_path,
        skeletons_dir=estimated.dir,
        features_dir=tiny_bundle.features_dir,
        out_dir=root / "model",
        reports_dir=root / "reports",
    )
    return types.SimpleNamespace(root=root, metrics=metrics, model_path=root / "model" / "model.pt")


def test_finetune_trains_every_stream_and_reports_the_skeleton_accuracy(finetuned, tiny_bundle):
    before, _ = export.load_fused(tiny_bundle.model_path)
    after, meta = export.load_fused(finetuned.model_path)  # evaluate's format: export reads it
    for name in before.names:
        a, b = before.streams[name].state_dict(), after.streams[name].state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point()), name
    torch.testing.assert_close(after.weights, before.weights)  # the fusion stays as evaluate set it
    m = finetuned.metrics
    assert (m["samples"], m["estimated_samples"], m["epochs"]) == (10, 6, 2)
    history = (finetuned.root / "reports" / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,loss,train_top1") and len(history) == 3
    # the reported .skeleton test top-1 is the saved model's, computed again here
    rt = training.setup_runtime("cpu", "off", "off")
    top1 = finetune_video.skeleton_test_top1(
        after, tiny_bundle.features_dir, "ntu120_xsub", LoaderParams(), rt, 8
    )
    assert m["skeleton_test_top1"] == round(top1, 5) == meta["metrics"]["centre_clip"]["fused"]["top1"]
    written = json.loads((finetuned.root / "reports" / "metrics.json").read_text())
    assert written["skeleton_test_top1"] == m["skeleton_test_top1"] and "seconds" not in written


def test_a_few_samples_are_overfit(corpus, tiny_bundle, tmp_path):
    """The tiny-overfit check of the fine-tune: full-batch steps fit 8 samples, 4 of them "estimated"
    (the files' joints with a smooth error; the untrained test estimator's are alike for every video)."""
    rng = np.random.default_rng(0)
    rows: dict[str, list] = {"true": [], "estimated": []}
    for name in [*corpus.train, corpus.broken]:
        joints = joints_from_skeleton_file(corpus.files[name].read_bytes())
        action = ntu_files.parse_name(name).action
        rows["true"].append((name, action, joints))
        drift = np.cumsum(rng.normal(0, 0.005, (3, joints.shape[1], 1, 1)), axis=1).astype(np.float32)
        rows["estimated"].append((name, action, np.where(joints != 0, joints + drift, 0)))
    video_skeletons.save(tmp_path / "skeletons", rows)
    params = finetune_video.FinetuneVideoParams(recipe=_recipe(15, batch_size=8, lr=0.1), eval_batch_size=16)
    metrics = finetune_video.run(
        params,
        dataclasses.replace(LoaderParams(), train_p_interval=(1.0, 1.0)),  # no crop: the same inputs
        FeaturesParams(),
        model_path=tiny_bundle.model_path,
        skeletons_dir=tmp_path / "skeletons",
        features_dir=tiny_bundle.features_dir,
        out_dir=tmp_path / "model",
        reports_dir=tmp_path / "reports",
    )
    rows = (tmp_path / "reports" / "history.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    assert losses[-1] < 0.5 * losses[0], losses
    assert metrics["train_top1_estimated"] == 1.0


def test_params_are_checked(tmp_path, capsys, estimated, tiny_bundle):
    params = tmp_path / "params.yaml"
    recipe = (
        "  recipe: {optimizer: sgd, lr: 0.01, weight_decay: 0.0, batch_size: 4, epochs: 1, ema_decay: 0.5}\n"
    )
    params.write_text("finetune_video:\n" + recipe + "train: {}\nloader: {}\nfeatures: {}\n")
    argv = [
        "--params", str(params), "--model", str(tiny_bundle.model_path), "--skeletons", str(estimated.dir),
        "--features-dir", str(tiny_bundle.features_dir), "--out-dir", str(tmp_path / "m"),
        "--reports-dir", str(tmp_path / "r"), "--no-mlflow",
    ]  # fmt: skip
    assert finetune_video.main(argv) == 2
    assert "ema_decay" in capsys.readouterr().err
    params.write_text(
        "finetune_video:\n" + recipe.replace(", ema_decay: 0.5", "") + "loader: {}\nfeatures: {}\n"
    )
    assert finetune_video.main([*argv[:4], "--skeletons", str(tmp_path / "none"), *argv[6:]]) == 2
    assert "skeletons.npz" in capsys.readouterr().err


@pytest.fixture(scope="module")
def video_bundle(finetuned, tiny_bundle, tmp_path_factory):
    """The fine-tuned model exported as the export_video stage exports it (its own name)."""
    out = tmp_path_factory.mktemp("export_video")
    params = export.ExportParams(
        calibration_samples=16, latency_runs=3, parity_samples=16, int8=False, name="ntu120-ctrgcn-video"
    )
    export.run(
        params,
        LoaderParams(),
        FeaturesParams(),
        model_path=finetuned.model_path,
        features_dir=tiny_bundle.features_dir,
        out_dir=out,
    )
    return out / "bundle"


def test_the_service_names_video_actions_with_the_video_model(
    video_bundle, tiny_bundle, corpus, tmp_path_factory, tmp_path
):
    pose_dir = pose_export(tmp_path_factory).dir
    clip = corpus.videos / f"{corpus.train[0]}_rgb.avi"
    upload = {"file": ("walk.avi", clip.read_bytes(), "video/x-msvideo")}
    video_model = model_loader.load(settings_for(video_bundle))
    clip_model = model_loader.load(settings_for(tiny_bundle.bundle_dir))
    _, skeleton = video.skeleton_from_file(clip, PoseRuntime.load(pose_dir))
    try:
        with serving(tiny_bundle.bundle_dir, pose_dir=pose_dir, video_bundle_dir=video_bundle) as c:
            body = c.post("/v1/predict/video", files=upload).json()
            assert body["model"] == {"name": "ntu120-ctrgcn-video", "version": video_model.meta["version"]}
            (window,) = body["windows"]
            (want,) = video_actions.skeleton_to_actions(skeleton.joints, video_model, window=0)
            np.testing.assert_allclose(
                window["prediction"]["probabilities"], want.prediction.probabilities, atol=1e-5
            )
            (other,) = video_actions.skeleton_to_actions(skeleton.joints, clip_model, window=0)
            assert not np.allclose(other.prediction.probabilities, want.prediction.probabilities, atol=1e-4)
            described = c.get("/v1/model").json()
            assert described["runtime"]["video"]["action_model"]["name"] == "ntu120-ctrgcn-video"
            assert described["name"] == clip_model.meta["name"]  # clips still get the clip model
        # a video bundle that fails its checksums: the video endpoint refuses, the clip endpoints work
        tampered = shutil.copytree(video_bundle, tmp_path / "tampered")
        (tampered / "labels.json").write_text("[]\n")
        with serving(tiny_bundle.bundle_dir, pose_dir=pose_dir, video_bundle_dir=tampered) as c:
            response = c.post("/v1/predict/video", files=upload)
            assert response.status_code == 503 and response.json()["code"] == "no_video_model"
            assert "checksum" in response.json()["detail"].lower() or "sha256" in response.json()["detail"]
            assert c.get("/ready").status_code == 200
            assert "unavailable" in c.get("/v1/model").json()["runtime"]["video"]["action_model"]
        # no video bundle: videos get the clip model
        with serving(tiny_bundle.bundle_dir, pose_dir=pose_dir, video_bundle_dir=tmp_path / "none") as c:
            body = c.post("/v1/predict/video", files=upload).json()
            assert body["model"]["name"] == clip_model.meta["name"]
            np.testing.assert_allclose(
                body["windows"][0]["prediction"]["probabilities"], other.prediction.probabilities, atol=1e-5
            )
    finally:
        video_model.cleanup.close()
        clip_model.cleanup.close()


def test_a_learned_fusion_head_is_fitted_again(estimated, tiny_bundle, tmp_path):
    from models.ctrgcn import config_for
    from models.two_stream import MultiStream
    from stages import evaluate

    _, meta = export.load_fused(tiny_bundle.model_path)
    names, ids = list(meta["class_names"]), list(meta["class_ids"])
    torch.manual_seed(1)
    model = MultiStream({s: config_for("small", len(names)) for s in ("joint", "bone")}, fusion="concat")
    record = evaluate.fused_record(model.eval(), names, ids, "ntu120_xsub", LoaderParams(), {})
    torch.save(record, tmp_path / "concat.pt")
    params = finetune_video.FinetuneVideoParams(recipe=_recipe(1), eval_batch_size=16)
    finetune_video.run(
        params,
        LoaderParams(),
        FeaturesParams(),
        model_path=tmp_path / "concat.pt",
        skeletons_dir=estimated.dir,
        features_dir=tiny_bundle.features_dir,
        out_dir=tmp_path / "model",
        reports_dir=tmp_path / "reports",
    )
    after, _ = export.load_fused(tmp_path / "model" / "model.pt")
    assert after.fusion == "concat"
    assert not torch.equal(after.head.weight, model.head.weight)
    # the saved head is the one fitted on the *fine-tuned* streams' outputs for the training samples
    xs, ys, _ = finetune_video.training_samples(video_skeletons.load(estimated.dir), ids, True, False)
    again, _ = export.load_fused(tmp_path / "model" / "model.pt")
    torch.nn.init.zeros_(again.head.weight)
    rt = training.setup_runtime("cpu", "off", "off")
    finetune_video.refit_fusion(again, xs, ys, LoaderParams(), rt, 16)
    torch.testing.assert_close(again.head.weight, after.head.weight)
    before_streams, _ = export.load_fused(tmp_path / "concat.pt")
    finetune_video.refit_fusion(before_streams, xs, ys, LoaderParams(), rt, 16)
    assert not torch.allclose(before_streams.head.weight, after.head.weight, atol=1e-4)


def test_video_skeletons_reads_the_true_joints_with_the_parse_stages_denoise_mode(tmp_path, monkeypatch):
    """``parse.denoise`` reaches the workers' true joints (``estimate_one``), from the CLI down."""
    from serving.video import VideoOptions
    from tests.factory import second_person_id_switch

    skeleton = tmp_path / "S001C001P001R001A050.skeleton"
    skeleton.write_bytes(second_person_id_switch(40))
    frames_of_person_2 = {}
    for mode in ("complete", "reference"):
        monkeypatch.setattr(video_skeletons, "_WORKER", {"pose": None, "options": VideoOptions(window=0)})
        video_skeletons._WORKER["denoise"] = mode
        out = video_skeletons.estimate_one(str(tmp_path / "missing.avi"), str(skeleton))
        assert out["reason"].startswith("video unreadable_video")  # the true side was read first
        frames_of_person_2[mode] = int(out["true"][..., 1].any(axis=(0, 2)).sum())
    assert frames_of_person_2 == {"complete": 40, "reference": 20}

    seen = {}
    monkeypatch.setattr(video_skeletons, "run", lambda params, **kw: seen.update(kw) or {})
    doc = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    doc["parse"]["denoise"] = "reference"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    args = ["--params", str(tmp_path / "params.yaml"), "--video-dir", "v", "--skeleton-dir", "s",
            "--pose-dir", "p", "--out-dir", str(tmp_path / "out")]  # fmt: skip
    assert video_skeletons.main(args) == 0 and seen["denoise"] == "reference"
