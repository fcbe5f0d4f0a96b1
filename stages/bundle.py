"""The served bundle: a directory the export stage writes and the server loads, checksummed.

Layout::

    bundle/
      model.onnx          fp32 fused model: joints (N, 3, T, 25, 2) -> scores (N, K)
      model.int8.onnx     the same, statically quantised (when the export made it)
      model.plan          TensorRT engine (only where it was built: CUDA + tensorrt)
      labels.json         [{"index", "id", "name"}] per class
      bundle.json         name, version, input spec, normalisation, sampling, fusion, metrics, files
      manifest.json       {"files": {name: {"sha256", "bytes"}}} for every file above

:func:`verify` recomputes every checksum and refuses a bundle with a missing, extra-but-listed, or
altered file, so the server never loads a model it cannot vouch for. Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
META = "bundle.json"
LABELS = "labels.json"
FORMAT = 1


class BundleError(RuntimeError):
    """A bundle that cannot be served: missing, incomplete or altered."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle_dir: Path) -> dict:
    """Checksum every file of ``bundle_dir`` (except the manifest) into ``manifest.json``."""
    bundle_dir = Path(bundle_dir)
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(bundle_dir.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": FORMAT, "files": files}
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: cannot read ({exc})") from None


def verify(bundle_dir: Path) -> dict:
    """Check ``bundle_dir`` against its manifest; return ``bundle.json`` (with ``labels`` added)."""
    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / MANIFEST).is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST} (not a bundle; run `dvc repro export`)")
    manifest = _read_json(bundle_dir / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise BundleError(
            f"{bundle_dir / MANIFEST}: format {manifest.get('format')!r}; this code reads {FORMAT}"
        )
    listed = manifest.get("files")
    if not isinstance(listed, dict) or META not in listed or LABELS not in listed:
        raise BundleError(f"{bundle_dir / MANIFEST}: must list {META} and {LABELS}")
    for name, entry in listed.items():
        if not isinstance(entry, dict):
            raise BundleError(f"{bundle_dir / MANIFEST}: the entry of {name!r} is not an object")
        path = bundle_dir / name
        if Path(name).name != name or name in (".", ".."):
            raise BundleError(f"{bundle_dir / MANIFEST}: {name!r} is not a file name of the bundle directory")
        if path.is_symlink():  # its target could be anywhere, and change between the check and the load
            raise BundleError(f"{path}: a symbolic link; a bundle holds its own files")
        if not path.is_file():
            raise BundleError(f"{bundle_dir}: {name} is listed in the manifest but missing")
        if sha256_file(path) != entry.get("sha256"):
            raise BundleError(f"{path}: checksum mismatch (altered or corrupt); refusing to load it")
    meta = _read_json(bundle_dir / META)
    labels = _read_json(bundle_dir / LABELS)
    models = meta.get("files", {})
    if not models.get("fp32") or models["fp32"] not in listed:
        raise BundleError(f"{bundle_dir / META}: the fp32 model is not a checksummed file of the bundle")
    for kind, name in models.items():
        if name is not None and (not isinstance(name, str) or name not in listed):
            raise BundleError(f"{bundle_dir / META}: files.{kind} = {name!r} is not in the manifest")
    return {**meta, "labels": labels}
