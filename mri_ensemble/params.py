"""params.yaml: read once, looked up by dotted key, with one-line errors naming the key."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def load_params(path: Path) -> dict[str, Any]:
    """``path`` (a params.yaml) as a mapping; ConfigError if missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (run from the project folder)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML ({first})") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return params


def get(
    params: Mapping[str, Any], dotted: str, default: Any = ..., kind: type | None = None
) -> Any:
    """``params['a']['b']`` for ``'a.b'``; ConfigError naming the key if missing or mistyped."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is not ...:
                return default
            raise ConfigError(f"params.yaml: missing key {dotted!r}")
        node = node[part]
    if kind is not None and not isinstance(node, kind):
        raise ConfigError(f"params.yaml: key {dotted!r} should be {kind.__name__}, found {node!r}")
    return node
