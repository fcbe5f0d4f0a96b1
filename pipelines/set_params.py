"""Flow parameters as DVC ``--set-param`` overrides: dotted ``params.yaml`` keys and their values.

A flow run's values reach the stages the way ``dvc exp run -S key=value`` sends them: written into
``params.yaml`` by DVC's own override code (:func:`pipelines.dvc_commands.set_params`), so the run's
DVC experiment, its MLflow runs and its Prefect parameters all hold the same values. This module only
turns the flow's parameters into overrides and checks them before anything runs: a key that
``params.yaml`` does not have is rejected with the keys that do exist, instead of DVC's Hydra error
after the fact.

Values travel as Hydra override text (DVC's ``-S`` grammar): :func:`to_override` writes a Python value
in it and :func:`parse_set_param` reads a command-line ``KEY=VALUE`` exactly as ``dvc exp run -S``
would, so ``-S train.streams=[joint]`` means the same on both command lines.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

from stages.tracking import flatten


class SetParamError(ValueError):
    """An override that ``params.yaml`` cannot take (unknown key, unsupported value)."""


def named_overrides(
    current: Mapping[str, Any],
    *,
    dataset: str | None = None,
    raw_dir: str | None = None,
    streams: list[str] | None = None,
    recipe: str | None = None,
    epochs: int | None = None,
    benchmark: str | None = None,
    set_params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The flow's named parameters as dotted keys; ``None`` leaves a value as ``params.yaml`` has it.

    ``epochs`` goes to the recipe that will train: ``recipe`` when given, else ``train.recipe`` as the
    run's other overrides (``set_params``) set it, else as ``params.yaml`` has it.
    """
    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("parse.dataset", dataset),
            ("data.raw_dir", raw_dir),
            ("train.streams", streams),
            ("train.recipe", recipe),
            ("train.benchmark", benchmark),
        )
        if value is not None
    }
    if epochs is not None:
        active = recipe or (set_params or {}).get("train.recipe") or lookup(current, "train.recipe")
        overrides[f"train.recipes.{active}.epochs"] = epochs
    return overrides


def merge(set_params: Mapping[str, Any], named: Mapping[str, Any]) -> dict[str, Any]:
    """``set_params`` plus the named parameters; one key given two different values is an error."""
    clashes = sorted(key for key in set_params.keys() & named.keys() if set_params[key] != named[key])
    if clashes:
        raise SetParamError(
            f"set both in set_params and as a named flow parameter, with different values: "
            f"{', '.join(clashes)}; give each once"
        )
    return {**set_params, **named}


def lookup(params: Mapping[str, Any], key: str) -> Any:
    """The value at dotted ``key`` of a ``params.yaml`` mapping; :class:`SetParamError` naming what
    exists when the key does not."""
    node: Any = params
    parts = key.split(".")
    for depth, part in enumerate(parts):
        parent = ".".join(parts[:depth]) or "params.yaml"
        if not isinstance(node, Mapping):
            raise SetParamError(f"unknown parameter {key!r}: {parent!r} is a value, not a section")
        if part not in node:
            raise SetParamError(
                f"unknown parameter {key!r}: {parent!r} has no key {part!r} "
                f"(it has: {', '.join(map(str, node))}){_did_you_mean(params, key)}"
            )
        node = node[part]
    return node


def check_keys(params: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """Every override names an existing ``params.yaml`` key (``dvc exp run -S`` adds none either)."""
    for key in overrides:
        lookup(params, key)


def _did_you_mean(params: Mapping[str, Any], key: str) -> str:
    # A misplaced key is the usual mistake (train.epochs for train.recipes.adamw.epochs): offer the
    # existing keys with the same last part first, then the closest spellings.
    keys = list(flatten(dict(params)))
    leaf = key.rsplit(".", 1)[-1]
    close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(key, keys, n=3)
    return f"; did you mean {' or '.join(close[:3])}?" if close else ""


def to_override(key: str, value: Any) -> str:
    """``key=value`` in Hydra's override grammar, the text ``dvc exp run -S`` takes."""
    return f"{key}={_hydra(value)}"


def _hydra(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_hydra(v) for v in value) + "]"
    if isinstance(value, Mapping):
        bad = [k for k in value if not (isinstance(k, str) and re.fullmatch(r"[A-Za-z_][\w-]*", k))]
        if bad:
            raise SetParamError(f"mapping keys must be plain names to pass as a DVC param: {bad!r}")
        return "{" + ",".join(f"{k}:{_hydra(v)}" for k, v in value.items()) + "}"
    raise SetParamError(f"{value!r} ({type(value).__name__}) cannot be written to params.yaml")


def _quote(text: str) -> str:
    # Hydra's quoted strings: a backslash escapes a quote, so backslashes right before a quote (or the
    # closing one) are doubled. "${...}" stays an interpolation, as it is for `dvc exp run -S`.
    body = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return f"'{body}'"


def parse_set_param(text: str) -> tuple[str, Any]:
    """A command-line ``KEY=VALUE`` read as ``dvc exp run -S`` reads it: ``[joint,bone]`` is a list,
    ``1e-3`` a float, ``true`` a bool, ``'12'`` a string."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    key, sep, _ = text.partition("=")
    if not sep or not key:
        raise SetParamError(f"-S {text!r}: expected KEY=VALUE, e.g. -S train.recipes.adamw.epochs=2")
    try:
        override = OverridesParser.create().parse_override(text)
    except OverrideParseException as exc:
        raise SetParamError(f"-S {text!r}: {exc}") from None
    return key, override.value()
