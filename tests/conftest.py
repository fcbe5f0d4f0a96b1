"""Shared fixtures: a tiny synthetic corpus carried through synthesize -> parse -> features, a bundle
exported from it, and the tiny DVC project built once by ``dvc repro``."""

from __future__ import annotations

import os

import pytest

# Under xdist each worker gets its share of the cores. The stages size torch's and ONNX Runtime's
# thread counts (and their process pools) from os.cpu_count(), so two workers on 2 cores ran 4 torch
# threads, spinning for each other's cores: two copies of test_a_few_samples_are_overfit at once
# took 90 s each, 40 s with one thread each. (Subprocesses, e.g. the stages dvc repro starts, see
# the real count; OMP_NUM_THREADS only sets torch's default there.)
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    _CORES_EACH = max(1, (os.cpu_count() or 1) // _XDIST_WORKERS)
    os.cpu_count = lambda: _CORES_EACH
    os.environ.setdefault("OMP_NUM_THREADS", str(_CORES_EACH))

from stages import features as features_stage  # noqa: E402 (after the thread share above)
from stages import parse, synthesize  # noqa: E402 (after the thread share above)
from tests.dvc_project import BuiltProject, dvc, make_project  # noqa: E402 (after the thread share above)

# The modules that use the built tiny project (``built_project``: one ``dvc repro`` of the whole DAG, the
# suite's longest setup). Under xdist (``-n 2`` in pyproject) they run in one worker, which builds it
# once; every other test is handed out on its own.
TINY_PROJECT_MODULES = ("tests/test_dvc_pipeline.py", "tests/test_flow.py")


def pytest_xdist_make_scheduler(config, log):
    """xdist's ``load`` distribution with the tests of :data:`TINY_PROJECT_MODULES` as one unit of work.

    (xdist's own ``loadgroup`` marks do not group under pytest 9, whose node ids can no longer be
    suffixed with the group name.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class TinyProjectTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tiny_project" if nodeid.split("::")[0] in TINY_PROJECT_MODULES else nodeid

    return TinyProjectTogether(config, log)


def pytest_collection_modifyitems(items):
    """Give schemathesis' items their operation as parameters in the node id.

    Under pytest 9 the items of one ``schema.parametrize`` test (one per API operation) share one node
    id: the operation is only in the item's name. xdist would then run one of them and drop the rest.
    """
    for item in items:
        original = getattr(item, "originalname", item.name)
        if item.name.startswith(original + "[") and item.nodeid.endswith("::" + original):
            item._id = item._id.with_params(item.name[len(original) + 1 : -1])


@pytest.fixture(scope="session", autouse=True)
def cpu_onnx_providers():
    """The service on ONNX Runtime's CPU provider in every test, as CI runs it: on a machine with
    onnxruntime-gpu it would choose TensorRT or CUDA, and the tests assert the CPU provider's
    settings (one single-threaded worker per core, micro-batching off) and fp32 parities of 1e-4.
    The GPU providers' sessions are tested with stand-ins (test_serving's TensorRT provider test)."""
    from serving import model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "ort_providers", lambda: ["CPUExecutionProvider"])
        yield


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory):
    """A features store of 3 synthetic classes (sit down, stand up, a two-person action), 4 performers
    (two in the X-Sub training half, two in the test half), 96 files; returns its directory."""
    root = tmp_path_factory.mktemp("tiny")
    classes = (8, 9, 50)
    synth = synthesize.SynthesizeParams(
        seed=7, classes=classes, num_subjects=4, num_setups=2, num_sessions=4, workers=1
    )
    synthesize.run(synth, out_dir=root / "raw")
    pparams = parse.ParseParams(workers=1, classes=classes, shard_samples=16, chunk_samples=8)
    parse.run(pparams, raw_dir=root / "raw", out_dir=root / "parsed")
    fparams = features_stage.FeaturesParams(shard_samples=16, chunk_samples=8)
    features_stage.run(fparams, in_dir=root / "parsed", out_dir=root / "features")
    return root / "features"


@pytest.fixture(scope="session")
def tiny_bundle(tiny_features, tmp_path_factory):
    """The export stage run on an untrained small joint+bone model over ``tiny_features``' 3 classes.

    Returns a namespace: ``model_path`` (the fused model.pt, as evaluate writes it), ``bundle_dir``,
    ``report`` (the export report) and ``features_dir``. The scores are arbitrary (no training), but
    every file of a real bundle is there, INT8 included when it stays within the allowed drop.
    """
    import types

    import torch

    from models.ctrgcn import config_for
    from models.two_stream import MultiStream
    from stages import evaluate, export
    from stages.dataset import LoaderParams
    from stages.features import FeaturesParams
    from stages.store import open_store

    root = tmp_path_factory.mktemp("bundle")
    attrs = open_store(tiny_features / "features.zarr", required=()).attrs
    names, ids = list(attrs["class_names"]), [int(c) for c in attrs["class_ids"]]
    torch.manual_seed(0)
    model = MultiStream(
        {s: config_for("small", len(names)) for s in ("joint", "bone")}, weights={"joint": 0.6, "bone": 0.6}
    ).eval()
    loader = LoaderParams()
    model_path = root / "model.pt"
    torch.save(evaluate.fused_record(model, names, ids, "ntu120_xsub", loader, {}), model_path)
    params = export.ExportParams(calibration_samples=16, latency_runs=3, int8_max_drop=100.0)
    report = export.run(
        params,
        loader,
        FeaturesParams(),
        model_path=model_path,
        features_dir=tiny_features,
        out_dir=root / "export",
        metrics_path=root / "metrics.json",
    )
    return types.SimpleNamespace(
        model_path=model_path,
        bundle_dir=root / "export" / "bundle",
        report=report,
        metrics_path=root / "metrics.json",
        features_dir=tiny_features,
    )


@pytest.fixture(scope="session")
def built_project(tmp_path_factory):
    """The tiny DVC project (:func:`tests.dvc_project.make_project`) after one ``dvc repro`` of the whole
    DAG. Tests that change its workspace work on a :func:`tests.dvc_project.copy_built` copy."""
    project = make_project(tmp_path_factory.mktemp("project"))
    return BuiltProject(project, dvc(project, "repro"))
