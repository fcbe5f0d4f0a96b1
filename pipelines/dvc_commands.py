"""The DVC commands the flow runs, one at a time, with their output streamed line by line.

Every DVC call of the flow holds one process-wide lock: DVC locks the repository for the length of a
command, so a second command at the same time would only fail. Output is read as it comes and handed
to a logger line by line (a progress bar's carriage-return redraws collapse to the line a terminal
would end up showing), so a Prefect task's log follows its stage live. A failed command raises
:class:`DvcCommandError` carrying the last lines of output, which hold the stage's own error message;
:class:`DvcLockError` when the failure was another DVC process holding the repository lock, the one
failure that is worth retrying.
"""

from __future__ import annotations

import graphlib
import json
import os
import re
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipelines.set_params import lookup, to_override
from stages.tracking import flatten

TAIL_LINES = 40  # lines of output an error carries: a traceback and DVC's own summary fit
_LOCK = threading.Lock()
_LOCK_BUSY = "Unable to acquire lock"  # dvc/lock.py: another DVC process holds the repository
_NODE = re.compile(r'^"(?P<name>[^"]+)";$')
_EDGE = re.compile(r'^"(?P<src>[^"]+)" -> "(?P<dst>[^"]+)";$')


class DvcCommandError(RuntimeError):
    """A DVC command exited non-zero; the message ends with the last lines of its output."""

    def __init__(self, command: Sequence[str], returncode: int, tail: Sequence[str]) -> None:
        super().__init__(list(command), returncode, list(tail))  # args as given: the error pickles
        self.command, self.returncode, self.tail = list(command), returncode, list(tail)

    def __str__(self) -> str:
        return f"`dvc {' '.join(self.command)}` failed (exit {self.returncode}):\n" + "\n".join(self.tail)


class DvcLockError(DvcCommandError):
    """Another DVC process held the repository lock: the command did nothing and may be retried."""


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for DVC and its stages: this interpreter's directory first on PATH
    (``dvc.yaml`` commands call ``python``) and unbuffered Python output, so stage lines arrive live."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1", **(extra or {})}


def terminal_line(raw: str) -> str:
    """What a terminal shows for one ``\\n``-terminated chunk: the text after its last ``\\r``."""
    return raw.rstrip("\n").rstrip("\r").rsplit("\r", 1)[-1]


def run(
    root: Path,
    args: Sequence[str],
    log: Callable[[str], None],
    extra_env: Mapping[str, str] | None = None,
) -> str:
    """``dvc <args>`` in ``root``, stdout and stderr passed to ``log`` line by line; returns them.

    Raises :class:`DvcLockError` when the repository lock was busy, else :class:`DvcCommandError`
    with the output's last :data:`TAIL_LINES` non-empty lines when the command fails.
    """
    lines: list[str] = []
    with _LOCK:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dvc", *args],
            cwd=root,
            env=environment(extra_env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = terminal_line(raw.decode(errors="replace"))
            lines.append(line)
            if line.strip():
                log(line)
        returncode = proc.wait()
    if returncode:
        raise _error(args, returncode, lines)
    return "\n".join(lines)


def query(root: Path, args: Sequence[str]) -> str:
    """``dvc <args>`` in ``root`` for its stdout (``dag --dot``, ``metrics show --json``); errors as
    :func:`run` raises them."""
    with _LOCK:
        result = subprocess.run(
            [sys.executable, "-m", "dvc", *args],
            cwd=root,
            env=environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
    if result.returncode:
        raise _error(args, result.returncode, (result.stdout + result.stderr).splitlines())
    return result.stdout


def _error(args: Sequence[str], returncode: int, lines: Sequence[str]) -> DvcCommandError:
    tail = list(deque((line for line in lines if line.strip()), maxlen=TAIL_LINES))
    kind = DvcLockError if any(_LOCK_BUSY in line for line in tail) else DvcCommandError
    return kind(args, returncode, tail)


def set_params(params_file: Path, overrides: Mapping[str, Any]) -> None:
    """Write ``overrides`` (dotted key -> value) into ``params_file`` with the code ``dvc exp run -S``
    uses, so the file ends up exactly as that command would leave it (comments kept; flow-style lists
    and YAML anchors of the file are rewritten by DVC, as ``-S`` does; a mapping value is merged into
    the existing mapping, as Hydra overrides are).

    The file is then read back the way the stages read it: DVC writes YAML 1.2, and a value such as
    the string ``off`` comes back as ``False`` from the stages' YAML 1.1 reader. Such a value raises
    ValueError and leaves the file as it was, rather than failing a stage later with a value the user
    never gave.
    """
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    original = params_file.read_text()
    with _LOCK:
        try:
            apply_overrides(params_file, [to_override(k, v) for k, v in overrides.items()])
        except InvalidArgumentError as exc:
            raise ValueError(f"{exc}: {exc.__cause__}") from None
    written = yaml.safe_load(params_file.read_text())
    misread = [k for k, v in overrides.items() if not _holds(lookup(written, k), v)]
    if misread:
        params_file.write_text(original)
        raise ValueError(
            f"{', '.join(f'{k}={overrides[k]!r}' for k in misread)}: DVC writes this as YAML that the "
            f"stages would read as something else (YAML 1.1: off/on/yes/no are booleans); "
            f"{params_file.name} is unchanged. Set it in {params_file.name} by hand, quoted."
        )


def _holds(written: Any, value: Any) -> bool:
    """Whether ``written`` is ``value`` after a YAML round trip; a mapping is merged into the existing
    one (Hydra's override semantics, so ``-S``'s too), so only its given keys are compared."""
    if isinstance(value, Mapping):
        return isinstance(written, Mapping) and all(
            k in written and _holds(written[k], v) for k, v in value.items()
        )
    return written == json.loads(json.dumps(value))  # tuples compare as the lists YAML gives back


def check_experiment_name(root: Path, name: str) -> None:
    """ValueError now, rather than after the whole pipeline, when ``dvc exp save --name name`` would
    refuse ``name``: not a valid git reference name, or taken by an experiment of this commit."""
    ref = subprocess.run(["git", "check-ref-format", f"refs/exps/{name}"], cwd=root, capture_output=True)
    if ref.returncode:
        raise ValueError(
            f"experiment name {name!r} is not a valid git reference name (see git check-ref-format)"
        )
    if name in query(root, ["exp", "list", "--name-only"]).split():
        raise ValueError(
            f"a DVC experiment named {name!r} already exists on this commit: choose another name, or "
            f"remove it first (dvc exp remove {name})"
        )


def stage_order(root: Path) -> list[str]:
    """The project's stages (``foreach`` items expanded: ``train_gcn@joint``) in an order that runs
    every stage after the stages it depends on, read from ``dvc dag``."""
    return topological_order(query(root, ["dag", "--dot"]))


def topological_order(dot: str) -> list[str]:
    """Stages of a ``dvc dag --dot`` graph, dependencies first; ties keep ``dvc.yaml``'s order."""
    needs: dict[str, list[str]] = {}
    for line in dot.splitlines():
        if edge := _EDGE.match(line.strip()):
            needs.setdefault(edge["src"], [])
            needs.setdefault(edge["dst"], []).append(edge["src"])
        elif node := _NODE.match(line.strip()):
            needs.setdefault(node["name"], [])
    return list(graphlib.TopologicalSorter(needs).static_order())


def stage_outcome(output: str) -> str:
    """What ``dvc repro`` decided for a stage, from its output: ``ran``, ``restored from run cache``
    or ``unchanged``."""
    if "Running stage" in output:
        return "ran"
    if "skipping run, checking out outputs" in output:
        return "restored from run cache"
    return "unchanged"


def metrics(root: Path) -> dict[str, dict[str, Any]]:
    """``dvc metrics show`` of the workspace: metrics file -> flattened values (``centre_clip.fused.top1``);
    a file DVC could not read maps to ``{"error": message}``."""
    shown = json.loads(query(root, ["metrics", "show", "--json"]) or "{}")
    files = shown.get("", {}).get("data", {})
    return {
        path: flatten(entry["data"]) if "data" in entry else {"error": str(entry.get("error"))}
        for path, entry in files.items()
    }
