"""Loading one ``params.yaml`` section into a frozen dataclass, failing loudly on bad keys.

Each stage declares its section as a frozen dataclass; ``load_section(path, "parse", ParseParams)``
checks that every key is known and every value has the declared type, so a typo in ``params.yaml``
stops the stage with a message naming the key instead of being silently ignored.

A value of 0 for threads or workers means "from the machine": :func:`usable_cpus`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def usable_cpus() -> int:
    """The CPUs this process may use: ``os.cpu_count()`` capped by its affinity mask (``taskset``,
    cpusets) and by a cgroup CPU quota (``docker --cpus``, Kubernetes limits), at least 1. The
    stages size thread counts and process pools with it (``os.cpu_count()`` is the host's count:
    64 threads in a 2-CPU container spin against each other)."""
    cpus = os.cpu_count() or 1
    with contextlib.suppress(AttributeError, OSError):  # no sched_getaffinity on macOS
        cpus = min(cpus, len(os.sched_getaffinity(0)))
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, int(quota))
    return max(1, cpus)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the process's cgroup may use per period (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``), or None without a limit."""
    with contextlib.suppress(OSError, ValueError):
        own = Path("/proc/self/cgroup").read_text().splitlines()
        path = next((line[3:] for line in own if line.startswith("0::")), "/")
        for where in (root / path.lstrip("/"), root):  # the process's cgroup, the namespace's root
            if (where / "cpu.max").is_file():
                quota, period = (where / "cpu.max").read_text().split()[:2]
                return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    return None


def torch_threads(share: int = 1) -> int:
    """Threads for torch in one of ``share`` processes: ``OMP_NUM_THREADS`` when it is set (torchrun
    and users set it), else this process's share of :func:`usable_cpus`."""
    with contextlib.suppress(ValueError):
        if (threads := int(os.environ.get("OMP_NUM_THREADS", "0"))) > 0:
            return threads
    return max(1, usable_cpus() // share)


class ParamsError(ValueError):
    """A ``params.yaml`` section that does not match its stage's declaration."""


def _check_value(section: str, key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    where = f"params.yaml [{section}] {key}"
    if origin is typing.Literal:
        if value not in args:
            raise ParamsError(f"{where} = {value!r}: must be one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_value(section, key, value, option)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError(f"{where} = {value!r} matches none of the allowed forms: {'; '.join(errors)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{where} = {value!r}: expected a list")
        item_type = args[0] if args else Any
        return tuple(_check_value(section, f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where} = {value!r}: expected a mapping")
        key_type, value_type = args
        return {
            _check_value(section, f"{key} (key)", k, key_type): _check_value(
                section, f"{key}.{k}", v, value_type
            )
            for k, v in value.items()
        }
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):  # a nested section, e.g. one training recipe
        if not isinstance(value, dict):
            raise ParamsError(f"{where} = {value!r}: expected a mapping")
        return from_mapping(f"{section}.{key}", annotation, value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{where} = {value!r}: expected a number")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where} = {value!r}: expected an integer")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise ParamsError(f"{where} = {value!r}: expected {annotation.__name__}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {where}")


def from_mapping(section: str, cls: type[T], values: dict[str, Any] | None) -> T:
    """Build the frozen dataclass ``cls`` from a mapping, checking keys and value types."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamsError(
            f"params.yaml [{section}]: unknown key(s) {', '.join(unknown)}; "
            f"valid keys are {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name in fields:
        if name in values:
            kwargs[name] = _check_value(section, name, values[name], hints[name])
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING]
        raise ParamsError(f"params.yaml [{section}]: missing key(s) {', '.join(missing)}") from exc
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def load_section(path: str | Path, section: str, cls: type[T], missing_ok: bool = False) -> T:
    """Read ``section`` of the YAML file at ``path`` into ``cls`` (see :func:`from_mapping`); with
    ``missing_ok`` a file without that section gives ``cls()``, its defaults."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} not found")
    doc = yaml.safe_load(path.read_text()) or {}
    if section not in doc and missing_ok:
        return cls()
    if section not in doc:
        raise ParamsError(f"{path}: no [{section}] section; sections present: {', '.join(sorted(doc))}")
    return from_mapping(section, cls, doc[section])
