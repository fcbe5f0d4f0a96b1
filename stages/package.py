"""Stage ``package``: register the exported bundle in the MLflow model registry, promoting it only if
it is at least as good as the champion.

1. **Check** the bundle against its manifest (:func:`stages.bundle.verify`), read the fused top-1
   from evaluate's ``metrics.json`` (``centre_clip.fused.top1``: the single centre clip the exported
   graph and the server's default sampling see) and check it is the evaluation the bundle was made
   from (same benchmark, same top-1 where the bundle records it).
2. **Register** a new version of the model named in the bundle (``export.name``): the ONNX model with
   its signature, the bundle, and evaluate's ``model.pt`` (layout: :mod:`stages.registry`), tagged
   with the benchmark, the top-1, the bundle version and the git commit, inside an MLflow run of the
   benchmark's experiment.
3. **Promote**: the alias ``package.alias`` (``champion``) moves to the new version only when
   :func:`decide` says so; otherwise the version stays a candidate and the stage prints why. The tag
   ``status`` records that decision; the alias says which version serves now.
4. **Record** the version in ``data/reports/package.json`` (a DVC metrics file), so the DAG and
   ``dvc metrics diff`` show which version a run made.

    python -m stages.package --bundle-dir data/export/bundle --checkpoint data/evaluate/model.pt \\
        --evaluation data/evaluate/metrics.json --out data/reports/package.json

The server then loads ``NTU_SERVE_MODEL_URI=models:/ntu120-ctrgcn@champion``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from stages import bundle
from stages.bundle import BundleError
from stages.params import ParamsError, load_section
from stages.registry import ModelVersion, Registry, RegistryError, registry_run
from stages.store import write_metrics
from stages.tracking import NullTracker, Tracker

TOP1_KEY = ("centre_clip", "fused", "top1")  # in evaluate's metrics.json (and bundle.json's copy)


@dataclass(frozen=True)
class PackageParams:
    """The ``package`` section of params.yaml."""

    alias: str = "champion"  # moved to a new version that is at least as good; the server loads it

    def validate(self) -> None:
        # MLflow reserves "latest" and "v<number>" (they name versions, not aliases)
        if not re.fullmatch(r"[\w-]{1,255}", self.alias) or re.fullmatch(r"(?i)latest|v\d+", self.alias):
            raise ParamsError(
                f"params.yaml [package] alias: {self.alias!r}; letters, digits, _ and -, "
                "neither 'latest' nor v<number>"
            )


class PackageError(RuntimeError):
    """The inputs of the stage do not describe one consistent, evaluated model."""


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def class_ids(meta: dict) -> str:
    """The NTU action ids a bundle classifies, in its label order: ``"8,9,50"`` (a registry tag)."""
    return ",".join(str(int(label["id"])) for label in meta["labels"])


def decide(
    top1: float, benchmark: str, champion: ModelVersion | None, classes: str | None = None
) -> Decision:
    """Whether a new version with fused ``top1`` on ``benchmark`` (classifying ``classes``, as
    :func:`class_ids` writes them) becomes the champion.

    It does when there is no champion, or when ``top1`` is at least the champion's on the same
    benchmark and classes (a tie promotes: the newer model is the one the current code and data
    produce). A champion measured on another benchmark or over other classes (the synthetic corpus's
    16 against real NTU-120's 120, say), or without a recorded top-1, cannot be compared: the new
    version stays a candidate rather than silently replacing a model judged on another test set.
    """
    if champion is None:
        return Decision(True, "no champion yet")
    held = f"the champion (version {champion.version})"
    if champion.benchmark != benchmark:
        return Decision(
            False,
            f"{held} was evaluated on {champion.benchmark or 'an unrecorded benchmark'}, this one on "
            f"{benchmark}: their top-1 cannot be compared; move the alias by hand if this is intended",
        )
    if classes is not None and champion.classes is not None and champion.classes != classes:
        theirs, ours = champion.classes.split(","), classes.split(",")
        return Decision(
            False,
            f"{held} classifies other actions ({len(theirs)} classes, this one {len(ours)}; other data "
            "or another parse.classes): their top-1 cannot be compared; move the alias by hand if this "
            "is intended",
        )
    if champion.top1 is None:
        return Decision(False, f"{held} has no recorded top-1 to compare with; move the alias by hand")
    if top1 >= champion.top1:
        return Decision(True, f"top-1 {top1:.5f} >= {champion.top1:.5f} of {held} on {benchmark}")
    return Decision(False, f"top-1 {top1:.5f} < {champion.top1:.5f} of {held} on {benchmark}")


@dataclass(frozen=True)
class Submission:
    """A verified bundle, its checkpoint and its evaluation: what one run of the stage registers."""

    bundle_dir: Path
    checkpoint: Path
    meta: dict  # bundle.json with its labels (stages.bundle.verify)
    top1: float

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def benchmark(self) -> str:
        return self.meta["benchmark"]


def _lookup(report: object, keys: tuple[str, ...]) -> object:
    """``report[k1][k2]...``, or None where a level is missing or not a mapping."""
    for key in keys:
        report = report.get(key) if isinstance(report, dict) else None
    return report


def read_submission(bundle_dir: Path, checkpoint: Path, evaluation: Path) -> Submission:
    """Verify the bundle and read the fused top-1; raises :class:`PackageError` or
    :class:`stages.bundle.BundleError` saying what is wrong, before anything is registered."""
    bundle_dir, checkpoint, evaluation = Path(bundle_dir), Path(checkpoint), Path(evaluation)
    meta = bundle.verify(bundle_dir)
    if not checkpoint.is_file():
        raise PackageError(f"{checkpoint}: no checkpoint there (run `dvc repro evaluate`)")
    try:
        report = json.loads(evaluation.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(
            f"{evaluation}: cannot read the evaluation ({exc}; run `dvc repro evaluate`)"
        ) from None
    top1 = _lookup(report, TOP1_KEY)
    if isinstance(top1, bool) or not isinstance(top1, int | float) or not 0 <= top1 <= 1:
        raise PackageError(f"{evaluation}: {'.'.join(TOP1_KEY)} is {top1!r}, not a top-1 in [0, 1]")
    if report.get("benchmark") != meta["benchmark"]:
        raise PackageError(
            f"{evaluation} is on {report.get('benchmark')!r} but the bundle {bundle_dir} on "
            f"{meta['benchmark']!r}: they are not one model (run `dvc repro export`)"
        )
    recorded = _lookup(meta.get("metrics", {}), ("evaluate", *TOP1_KEY))
    if recorded is not None and recorded != top1:
        raise PackageError(
            f"{evaluation} says top-1 {top1} but the bundle {bundle_dir} was exported from an evaluation "
            f"with {recorded} (run `dvc repro export`)"
        )
    return Submission(bundle_dir, checkpoint, meta, float(top1))


def run(
    params: PackageParams,
    submission: Submission,
    *,
    registry: Registry,
    out: Path,
    tracker: Tracker | None = None,
) -> dict:
    """Register ``submission`` as a new version, move ``params.alias`` to it when :func:`decide` says
    so, and write the summary (also returned) to ``out``."""
    tracker = tracker or NullTracker()
    name, benchmark, top1 = submission.name, submission.benchmark, submission.top1
    champion = registry.version_with_alias(name, params.alias)
    classes = class_ids(submission.meta)
    decision = decide(top1, benchmark, champion, classes)
    tags = {
        "benchmark": benchmark,
        "top1": str(top1),
        "classes": classes,
        "bundle_version": submission.meta["version"],
        "checkpoint_sha256": bundle.sha256_file(submission.checkpoint),
    }
    version = registry.register(name, submission.bundle_dir, submission.checkpoint, submission.meta, tags)
    status = params.alias if decision.promote else "candidate"
    if decision.promote:
        registry.set_alias(name, params.alias, version)
    # tagged after the alias moved, so a failed move never leaves a version tagged as the champion
    registry.set_tags(name, version, {"status": status, "reason": decision.reason})
    summary = {
        "name": name,
        "version": int(version),
        "model_uri": f"models:/{name}/{version}",
        "alias": params.alias,
        "status": status,
        "reason": decision.reason,
        "benchmark": benchmark,
        "top1": top1,
        "champion_before": int(champion.version) if champion else None,
        "champion_before_top1": champion.top1 if champion else None,
        "bundle_version": submission.meta["version"],
    }
    tracker.log_params({"alias": params.alias, "name": name, "bundle_version": summary["bundle_version"]})
    tracker.log_metrics({"top1": top1, "registered_version": int(version)})
    tracker.set_tags({"package.status": status, "package.model_uri": summary["model_uri"]})
    write_metrics(out, summary)
    verdict = f"now {name}@{params.alias}" if decision.promote else "stays a candidate"
    print(f"package: registered {summary['model_uri']} (top-1 {top1:.5f} on {benchmark}): {verdict}")
    print(f"package: {decision.reason}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", type=Path)
    ap.add_argument("--bundle-dir", required=True, type=Path, help="export's bundle (with manifest.json)")
    ap.add_argument("--checkpoint", required=True, type=Path, help="evaluate's fused model.pt")
    ap.add_argument(
        "--evaluation", required=True, type=Path, help="evaluate's metrics.json (the fused top-1)"
    )
    ap.add_argument("--out", required=True, type=Path, help="the registered version, as JSON (DVC metrics)")
    args = ap.parse_args(argv)
    try:
        params = load_section(args.params, "package", PackageParams)
        submission = read_submission(args.bundle_dir, args.checkpoint, args.evaluation)
        with registry_run(submission.benchmark, "package", "package") as registry:
            run(params, submission, registry=registry, out=args.out, tracker=registry.tracker)
    except (ParamsError, PackageError, BundleError, RegistryError) as exc:
        print(f"package: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
