"""DVC stage ``synthesize``: write the embedded synthetic NTU corpus (``.skeleton`` files + manifest).

``python -m stages.synthesize --params params.yaml --out-dir data/raw/synthetic``

The corpus is in the exact NTU RGB+D file format (see ``stages/skeleton_text.py``), with real NTU-120
class ids, X-Sub/X-Set/X-View-meaningful names and the faults of real Kinect files. Every file depends
only on the seed, the parameters and its name, so the output is byte-identical for any worker count.
The output directory is built in a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from stages.ntu_files import MUTUAL_ACTIONS, SampleName, class_names
from stages.params import ParamsError, load_section, usable_cpus
from stages.store import atomic_directory
from stages.synth.actions import PROGRAMS
from stages.synth.sample import SyntheticSample, corpus_names, corpus_subjects, generate_sample

__all__ = ["SynthesizeParams", "SyntheticSample", "corpus_names", "generate_sample", "main", "run"]

DEFAULT_CLASSES = (6, 7, 8, 9, 10, 23, 24, 26, 27, 38, 43, 50, 52, 55, 58, 59)


@dataclass(frozen=True)
class SynthesizeParams:
    """The ``synthesize:`` section of ``params.yaml`` (see the comments there for each key)."""

    seed: int = 2026
    classes: tuple[int, ...] = DEFAULT_CLASSES
    num_subjects: int = 25
    num_setups: int = 8
    num_sessions: int = 25
    workers: int = 0
    jitter_mm: float = 4.0
    inferred_rate: float = 0.04
    untracked_rate: float = 0.004
    short_noise_rate: float = 0.12
    furniture_rate: float = 0.05
    id_switch_rate: float = 0.04
    empty_frame_rate: float = 0.004
    unusable_rate: float = 0.008
    long_idle_rate: float = 0.04

    def validate(self) -> None:
        """Raise :class:`ParamsError` for values that cannot make a valid corpus."""
        where = "params.yaml [synthesize]"
        unknown = [c for c in self.classes if c not in PROGRAMS]
        if unknown or not self.classes or len(set(self.classes)) != len(self.classes):
            raise ParamsError(
                f"{where} classes {list(self.classes)}: need distinct ids with a motion program; "
                f"unknown {unknown}; implemented: {sorted(PROGRAMS)}"
            )
        if not 1 <= self.num_subjects <= 106 or not 1 <= self.num_setups <= 999 or self.num_sessions < 1:
            raise ParamsError(
                f"{where}: need 1 <= num_subjects <= 106, 1 <= num_setups <= 999, num_sessions >= 1"
            )
        pairs = self.num_subjects * self.num_setups // math.gcd(self.num_subjects, self.num_setups)
        if self.num_sessions > pairs:
            raise ParamsError(
                f"{where} num_sessions = {self.num_sessions}: at most {pairs} distinct (subject, setup) "
                "sessions exist for these num_subjects and num_setups; raise one of them"
            )
        rates = ("inferred_rate", "untracked_rate", "short_noise_rate", "furniture_rate", "id_switch_rate",
                 "empty_frame_rate", "unusable_rate", "long_idle_rate")  # fmt: skip
        bad = [r for r in rates if not 0.0 <= getattr(self, r) <= 1.0]
        if bad or self.jitter_mm < 0 or self.workers < 0:
            raise ParamsError(f"{where}: rates must lie in [0, 1] ({', '.join(bad) or 'ok'}); "
                              "jitter_mm and workers must be >= 0")  # fmt: skip


def _write_one(job: tuple[SampleName, SynthesizeParams, str]) -> tuple[str, int, int, tuple[str, ...]]:
    name, params, directory = job
    sample = generate_sample(name, params)
    (Path(directory) / f"{sample.name}.skeleton").write_bytes(sample.data)
    return sample.name, len(sample.frames), len(sample.data), sample.faults


def run(params: SynthesizeParams, *, out_dir: Path) -> dict:
    """Generate the corpus into ``out_dir`` (replaced atomically) and return a summary.

    The summary (also in ``out_dir/corpus.json`` with the per-sample fault list) holds the params, the
    classes, counts by class and by fault, frame statistics, size in bytes and the wall time in seconds.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    names = corpus_names(params)
    workers = params.workers or usable_cpus()
    with atomic_directory(out_dir) as tmp:
        jobs = [(name, params, str(tmp)) for name in names]
        if workers == 1:
            results = [_write_one(job) for job in tqdm(jobs, desc="synthesize", unit="file")]
        else:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                stream = pool.imap(_write_one, jobs, chunksize=8)
                results = list(tqdm(stream, total=len(jobs), desc="synthesize", unit="file"))
        summary = _summary(params, names, results)
        manifest = dict(
            summary, samples=[{"name": n, "frames": f, "faults": list(k)} for n, f, _, k in results]
        )
        (tmp / "corpus.json").write_text(json.dumps(manifest, indent=1) + "\n")
    summary["seconds"] = round(time.perf_counter() - start, 2)  # printed, not in the (deterministic) manifest
    return summary


def _summary(params, names, results) -> dict:
    by_name = {n.name: n for n in names}
    frames = [f for _, f, _, _ in results]
    return {
        "params": {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items() if k != "workers"
        },
        "classes": {str(c): class_names()[c] for c in params.classes},
        "mutual_classes": [c for c in params.classes if c in MUTUAL_ACTIONS],
        "subjects": corpus_subjects(params),
        "num_samples": len(results),
        "count_by_class": dict(sorted(Counter(str(by_name[n].action) for n, *_ in results).items())),
        "count_by_fault": dict(sorted(Counter(k for *_, ks in results for k in ks).items())),
        "frames": {"min": min(frames), "max": max(frames), "mean": round(sum(frames) / len(frames), 2)},
        "bytes": sum(b for _, _, b, _ in results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)"
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="output directory (replaced)")
    parser.add_argument("--num-sessions", type=int, help="override num_sessions (96 files each by default)")
    parser.add_argument("--workers", type=int, help="override workers (0 = all cores)")
    args = parser.parse_args(argv)
    try:
        params = load_section(args.params, "synthesize", SynthesizeParams)
        overrides = {
            k: v for k, v in (("num_sessions", args.num_sessions), ("workers", args.workers)) if v is not None
        }
        if overrides:
            params = replace(params, **overrides)
            params.validate()
    except ParamsError as exc:
        print(f"synthesize: error: {exc}", file=sys.stderr)
        return 2
    summary = run(params, out_dir=args.out_dir)
    print(
        json.dumps({k: summary[k] for k in ("num_samples", "count_by_fault", "frames", "bytes", "seconds")})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
