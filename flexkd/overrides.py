"""Profiles and dotted overrides of ``params.yaml``: what ``make profile``, ``python -m flows.pipeline --profile
--set`` and the deployments' parameters do before a run, and how the benchmarks read a profile with ``--set``.

``apply_profile_and_overrides`` copies ``profiles/<name>.yaml`` over ``params.yaml`` and sets dotted keys in it
(comments kept), validated by :func:`flexkd.config.parse_config` before anything is written: a wrong key or
value leaves ``params.yaml`` as it was. ``set_dotted`` sets one key in a params tree.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping

from flexkd.config import parse_config
from flexkd.errors import ConfigError
from flexkd.provenance import atomic_write_text

__all__ = ["apply_profile_and_overrides", "available_profiles", "load_profile", "parse_set", "set_dotted"]


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set a dotted key (``distill.train.epochs``) in a params tree, creating groups; parse_config checks it."""
    parts = key.split(".") if isinstance(key, str) else []
    if not parts or any(not part.strip() for part in parts):
        raise ConfigError(f"overrides: {key!r} is not a dotted parameter key such as 'distill.train.epochs'")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, Mapping) else None
        if child is None:
            node[part] = child = {}  # an unknown group: parse_config names it below
        if not isinstance(child, Mapping):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"overrides: {key}: {where} is a value ({child!r}), not a group of parameters")
        node = child
    node[parts[-1]] = value


def available_profiles(root: Path) -> list[str]:
    directory = Path(root) / "profiles"
    return sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []


def _yaml():
    from ruamel.yaml import YAML  # round-trip: keeps the comments of params.yaml (a DVC dependency)

    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.width = 120
    rt.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def _flow_style(value: Any) -> Any:
    """A list of scalars as ``[a, b]``, like the lists in params.yaml."""
    from ruamel.yaml.comments import CommentedSeq

    if isinstance(value, list) and all(not isinstance(v, (list, dict)) for v in value):
        seq = CommentedSeq(value)
        seq.fa.set_flow_style()
        return seq
    return value


def apply_profile_and_overrides(root: Path, profile: str | None = None,
                                overrides: Mapping[str, Any] | None = None) -> bool:
    """Write ``params.yaml`` from ``profiles/<profile>.yaml`` and/or dotted ``overrides``, validated first.

    Returns True when ``params.yaml`` changed. Raises :class:`flexkd.errors.ConfigError` (``params.yaml``
    untouched) for an unknown profile, a malformed key, or a result that :func:`parse_config` rejects.
    """
    root = Path(root)
    params = root / "params.yaml"
    if not profile and not overrides:
        return False
    source = params
    if profile:
        names = available_profiles(root)
        if profile not in names:
            listed = ", ".join(names) if names else f"none: {root / 'profiles'} has no .yaml files"
            raise ConfigError(f"profile: unknown profile {profile!r}; the profiles are: {listed}")
        source = root / "profiles" / f"{profile}.yaml"
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides: expected a mapping of dotted keys to values, got {type(overrides).__name__}")
    if not source.is_file():
        raise ConfigError(f"{source}: parameter file not found")
    text = source.read_text(encoding="utf-8")
    if overrides:
        rt = _yaml()
        tree = rt.load(text) or {}
        for key, value in overrides.items():
            set_dotted(tree, key, _flow_style(value))
        out = io.StringIO()
        rt.dump(tree, out)
        text = out.getvalue()
    import yaml

    label = f"{source.relative_to(root)}" + (f" with overrides {json.dumps(dict(overrides), default=str)}" if overrides else "")
    parse_config(yaml.safe_load(text) or {}, source=label)  # a wrong key or value stops here, nothing written
    if params.exists() and params.read_text(encoding="utf-8") == text:
        return False
    atomic_write_text(params, text)
    return True


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a.b": 1, "c": ["x", "y"]}``: each value read as YAML (what ``--set`` and
    ``dvc exp run -S`` take); an item without ``=`` is refused."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set distill.train.epochs=1")
        overrides[key.strip()] = yaml.safe_load(value)  # 1 -> int, [ft, flexkd] -> list, text -> str
    return overrides


def load_profile(params: str | Path, overrides: Mapping[str, Any] | None = None) -> dict:
    """A params file as a dict, with dotted ``overrides`` set (not validated: the caller's parse_config does it)."""
    import yaml

    raw = yaml.safe_load(Path(params).read_text(encoding="utf-8"))
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return raw
