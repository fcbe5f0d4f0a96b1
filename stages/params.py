"""Loading one ``params.yaml`` section into a frozen dataclass, failing loudly on bad keys.

Each stage declares its section as a frozen dataclass; ``load_section(path, "parse", ParseParams)``
checks that every key is known and every value has the declared type, so a typo in ``params.yaml``
stops the stage with a message naming the key instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


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


def load_section(path: str | Path, section: str, cls: type[T]) -> T:
    """Read ``section`` of the YAML file at ``path`` into ``cls`` (see :func:`from_mapping`)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} not found")
    doc = yaml.safe_load(path.read_text()) or {}
    if section not in doc:
        raise ParamsError(f"{path}: no [{section}] section; sections present: {', '.join(sorted(doc))}")
    return from_mapping(section, cls, doc[section])
