"""The MLflow model registry behind a small interface, so that :func:`stages.package.run` never imports
MLflow (as :mod:`stages.tracking` does for runs).

A registered version points at an MLflow 3 logged model (``models:/m-<id>``) whose artifacts are::

    MLmodel, model.onnx, ...  the ONNX flavour: the fp32 model with its signature (mlflow.onnx, pyfunc)
    bundle/                   the export stage's bundle, byte for byte, with its manifest.json: what the
                              server downloads (``models:/<name>@champion``) and verifies
    checkpoint/model.pt       evaluate's fused PyTorch checkpoint (to fine-tune or re-export from)

The fp32 ONNX file is stored twice on purpose: the bundle is trusted only whole, against its own
manifest, while MLflow's flavour writer re-serialises the file it is given.

The store is ``MLFLOW_TRACKING_URI`` (default ``sqlite:///mlflow.db``), the registry
``MLFLOW_REGISTRY_URI`` when set, else the same store. Unlike :class:`stages.tracking.MlflowTracker`,
a registry call that fails stops the stage with a :class:`RegistryError`: a model that is not
registered must not look packaged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from stages.tracking import DEFAULT_TRACKING_URI, Tracker, git_commit, mlflow_run

CHECKPOINT_DIR = "checkpoint"
BUNDLE_DIR = "bundle"


class RegistryError(RuntimeError):
    """The MLflow store cannot be reached, or refused a registry call."""


@dataclass(frozen=True)
class ModelVersion:
    """A registered version as the promotion rule sees it: its number and the tags it was given."""

    version: str
    benchmark: str | None
    top1: float | None
    classes: str | None = None  # the NTU action ids it classifies, "8,9,50" (None: not recorded)


class Registry(Protocol):
    """What stage ``package`` needs of a model registry (:class:`MlflowRegistry`)."""

    def version_with_alias(self, name: str, alias: str) -> ModelVersion | None: ...
    def register(
        self, name: str, bundle_dir: Path, checkpoint: Path, meta: dict, tags: dict[str, str]
    ) -> str: ...
    def set_alias(self, name: str, alias: str, version: str) -> None: ...
    def set_tags(self, name: str, version: str, tags: dict[str, str]) -> None: ...


def onnx_signature(meta: dict):
    """The MLflow signature of the bundle's fp32 model (from ``bundle.json`` and its labels):
    ``joints`` float32 ``(-1, 3, -1, 25, 2)`` -> ``scores`` float32 ``(-1, K)``; batch and frames are
    dynamic, as exported (a signature inferred from one example would pin the frames)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    spec = meta["input"]
    joints = (-1, spec["channels"], -1, spec["joints"], spec["persons"])
    scores = (-1, len(meta["labels"]))
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), joints, spec["name"])]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), scores, spec["output"])]),
    )


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


class MlflowRegistry:
    """:class:`Registry` on MLflow; every failed call raises :class:`RegistryError` saying what failed."""

    def __init__(self, mlflow_module, tracker: Tracker, uri: str) -> None:
        self._mlflow = mlflow_module
        self._client = mlflow_module.MlflowClient()
        self.tracker = tracker
        self.uri = uri

    @contextlib.contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        try:
            yield
        except RegistryError:
            raise
        except Exception as exc:  # MLflow raises many kinds (MlflowException, OSError, SQL, HTTP)
            raise RegistryError(f"MLflow store {self.uri}: cannot {what}: {exc}") from None

    def version_with_alias(self, name: str, alias: str) -> ModelVersion | None:
        """The version ``name@alias`` points to, or None when the model or the alias does not exist."""
        from mlflow.exceptions import MlflowException

        with self._calling(f"read {name}@{alias}"):
            try:
                aliases = self._client.get_registered_model(name).aliases
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return None
                raise
            if alias not in aliases:
                return None
            found = self._client.get_model_version(name, str(aliases[alias]))
        tags = found.tags or {}
        return ModelVersion(
            str(found.version), tags.get("benchmark"), _float_or_none(tags.get("top1")), tags.get("classes")
        )

    def register(
        self, name: str, bundle_dir: Path, checkpoint: Path, meta: dict, tags: dict[str, str]
    ) -> str:
        """Log the bundle (layout in the module docstring) as a model of the active run and register it
        as a new version of ``name`` with ``tags`` (and the git commit); returns the version number."""
        import mlflow.onnx
        import onnx

        with self._calling(f"log and register {bundle_dir} as a version of {name}"):
            info = mlflow.onnx.log_model(
                onnx.load(str(bundle_dir / meta["files"]["fp32"])),
                name=name,
                signature=onnx_signature(meta),
                save_as_external_data=False,  # one file, as in the bundle
            )
            self._client.log_model_artifacts(info.model_id, str(bundle_dir), BUNDLE_DIR)
            self._client.log_model_artifact(info.model_id, str(checkpoint), CHECKPOINT_DIR)
            version = self._mlflow.register_model(
                info.model_uri, name, tags={**tags, "git_commit": git_commit()}
            )
        return str(version.version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        with self._calling(f"point {name}@{alias} at version {version}"):
            self._client.set_registered_model_alias(name, alias, version)

    def set_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        with self._calling(f"tag version {version} of {name}"):
            for key, value in tags.items():
                self._client.set_model_version_tag(name, version, key, value)


@contextlib.contextmanager
def registry_run(benchmark: str, run_name: str, stage: str) -> Iterator[MlflowRegistry]:
    """A :class:`MlflowRegistry` inside an MLflow run of the benchmark's experiment
    (:func:`stages.tracking.mlflow_run`: git commit tag, ``MLFLOW_PARENT_RUN_ID`` nesting)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    with contextlib.ExitStack() as stack:
        try:
            import mlflow

            tracker = stack.enter_context(mlflow_run(benchmark, run_name, stage, required=True))
        except Exception as exc:  # an unreachable, locked or unwritable store
            raise RegistryError(f"cannot open a run in the MLflow store {uri}: {exc}") from None
        yield MlflowRegistry(mlflow, tracker, uri)
