"""What a flow run produced, as one record and as the Markdown of its Prefect summary artifact.

The record gathers the DVC experiment, the MLflow parent run, what DVC did with each stage, the
metrics files DVC declares (``dvc metrics show``), the registered model that the ``package`` stage
reports (absent until that stage exists and has run) and where the served bundle is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.settings import Settings
from stages.tracking import flatten

# The package stage's report: the registered model's name, version and alias.
PACKAGE_REPORT = Path("data/reports/package.json")


@dataclass(frozen=True)
class RunSummary:
    """One flow run: ``stages`` maps each DVC stage to what DVC did (``ran``, ``unchanged``...),
    ``metrics`` each metrics file to its flattened values, ``model`` the package report (``None``
    before the package stage exists) and ``bundle`` the bundle directory (``None`` when missing)."""

    experiment: str
    mlflow_experiment: str
    mlflow_run_id: str
    stages: dict[str, str]
    metrics: dict[str, dict[str, Any]]
    model: dict[str, Any] | None
    bundle: str | None


def package_report(root: Path) -> dict[str, Any] | None:
    """The package stage's report in ``root``, flattened, or ``None`` when there is none yet."""
    path = root / PACKAGE_REPORT
    return flatten(json.loads(path.read_text())) if path.is_file() else None


def bundle_dir(root: Path) -> Path:
    """The bundle the service loads by default (``NTU_SERVE_BUNDLE_DIR``'s default) under ``root``."""
    return root / Settings.model_fields["bundle_dir"].default


def markdown(summary: RunSummary) -> str:
    """The summary artifact: stages, metrics table, registered model and bundle location."""
    lines = [
        f"# train-ntu120: `{summary.experiment}`",
        "",
        f"DVC experiment `{summary.experiment}` (`dvc exp show`), MLflow run `{summary.mlflow_run_id}` "
        f"in experiment `{summary.mlflow_experiment}` with the stages' runs nested under it.",
        "",
        "## Stages",
        "",
        *_table(("stage", "DVC"), summary.stages.items()),
        "",
        "## Metrics",
        "",
        *_table(
            ("file", "metric", "value"),
            ((path, key, value) for path, values in summary.metrics.items() for key, value in values.items()),
        ),
        "",
        "## Registered model",
        "",
    ]
    if summary.model is None:
        lines.append(f"None: `{PACKAGE_REPORT}` is absent (no package stage has run).")
    else:
        lines.extend(_table(("field", "value"), summary.model.items()))
    lines += ["", "## Bundle", ""]
    if summary.bundle is None:
        lines.append("No bundle: the export stage's output is missing.")
    else:
        lines.append(f"`{summary.bundle}` (served by `uvicorn serving.app:app` from the project root)")
    return "\n".join(lines) + "\n"


def _table(header: tuple[str, ...], rows: Any) -> list[str]:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    body = [f"| {' | '.join(cell(v) for v in row)} |" for row in rows]
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *body]
