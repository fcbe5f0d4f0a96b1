"""Shared fixtures: a tiny synthetic corpus carried through synthesize -> parse -> features."""

from __future__ import annotations

import pytest

from stages import features as features_stage
from stages import parse, synthesize


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
