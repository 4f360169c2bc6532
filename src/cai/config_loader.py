"""Loading typed configs: YAML files plus ``key=value`` overrides, checked before any model loads.

Every config class forbids unknown keys, so a typo (``temprature: 0.7``) fails at once with a
sentence that names the key and the keys that are allowed there. Overrides use dotted keys and
YAML values: ``sampling.temperature=0.7``, ``model.name=path/to/model``.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from cai.errors import CaiError

C = TypeVar("C", bound=BaseModel)




def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file, turning every way it can be unreadable into one CaiError sentence."""
    path = Path(path)
    if not path.exists():
        raise CaiError(f"config file {path} does not exist")
    if path.is_dir():
        raise CaiError(f"config path {path} is a folder, not a YAML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise CaiError(f"{path} is not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8") from err
    except OSError as err:
        raise CaiError(f"cannot read {path}: {err.strerror}") from err
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CaiError(f"{path} is not valid YAML{where}: {problem}") from err


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CaiError(f"override '{item}' is not of the form key=value (e.g. sampling.temperature=0.7)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise CaiError(f"override '{item}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _describe(error: dict[str, Any], cls: type[BaseModel], source: str) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = _keys_at(cls, loc[:-1])
        hint = f"; known keys there: {', '.join(allowed)}" if allowed else ""
        return f"{source}: unknown key '{key}'{hint}"
    if error["type"] == "value_error":  # a validator's own sentence, about the section at `key`
        return f"{source}: {error['msg'].removeprefix('Value error, ').replace('{key}', key)}"
    if error["type"] == "missing":
        return f"{source}: required key '{key}' is missing"
    got = error.get("input")
    got_text = f" (got {json.dumps(got) if isinstance(got, (str, int, float, bool)) else type(got).__name__})"
    return f"{source}: '{key}' {error['msg'][0].lower()}{error['msg'][1:]}{got_text}"


def _keys_at(cls: type[BaseModel], loc: list[str]) -> list[str]:
    """The field names of the (nested) config class at ``loc``, for error hints."""
    current: Any = cls
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return list(getattr(current, "model_fields", {}))


def load_config(cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Build a config of type ``cls`` from an optional YAML file and ``key=value`` overrides.

    Raises:
        CaiError: unreadable or malformed YAML, a bad override, an unknown key or a wrong type,
            named in one sentence.
    """
    source = str(path) if path is not None else "overrides"
    data: Any = {}
    if path is not None:
        data = read_yaml(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise CaiError(f"{path} must hold a mapping of keys to values at the top level, not a {type(data).__name__}")
    data = apply_overrides(data, overrides)
    # Sections given partly keep the defaults of the keys they don't mention (a `response:` section
    # that sets only max_new_tokens must not reset its temperature).
    data = _merge(cls().model_dump(), data)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        error = err.errors()[0]
        # Blame the override that set the bad key (the last one wins), not a file that may not hold it.
        key = ".".join(str(p) for p in error["loc"]) + "."
        setters = [o for o in overrides if key.startswith(o.partition("=")[0].strip() + ".")
                   or (o.partition("=")[0].strip() + ".").startswith(key)]  # a key inside a failing section
        raise CaiError(_describe(error, cls, f"override '{setters[-1]}'" if setters else source)) from err


def _merge(defaults: Any, given: Any) -> Any:
    if isinstance(defaults, dict) and isinstance(given, dict):
        merged = dict(defaults)
        for key, value in given.items():
            merged[key] = _merge(defaults.get(key), value) if key in defaults else value
        return merged
    return given


def config_to_yaml(config: BaseModel) -> str:
    """The resolved config as YAML (what gets written next to every output)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def config_hash(config: BaseModel) -> str:
    """A short stable hash of a config's content, to detect a changed config for an existing run."""
    return config_hash_of(config.model_dump(mode="json"))


def config_hash_of(data: Any) -> str:
    """A short stable hash of plain (JSON-able) data."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FieldDoc:
    """One config key as ``cai config show`` prints it."""

    key: str
    type: str
    default: str
    description: str


def describe_fields(cls: type[BaseModel], section: str | None = None) -> list[FieldDoc]:
    """Every leaf key of a config class (nested sections flattened to dotted keys), with its docs.

    Args:
        section: a dotted section (``rl.ppo``) to list alone; None lists everything.

    Raises:
        CaiError: ``section`` names no section of ``cls``.
    """
    current: Any = cls
    prefix = ""
    for part in (section.split(".") if section else []):
        field = getattr(current, "model_fields", {}).get(part)
        sub = _section_class(field.annotation) if field is not None else None
        if sub is None:
            known = [k for k, f in getattr(current, "model_fields", {}).items() if _section_class(f.annotation)]
            raise CaiError(f"'{section}' is not a config section; sections{f' under {prefix[:-1]}' if prefix else ''}: "
                           f"{', '.join(known)}")
        current, prefix = sub, f"{prefix}{part}."
    return _leaf_docs(current, prefix, current())


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The config class a field holds (also through ``X | None``), or None for a plain value."""
    candidates = [annotation, *typing.get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _leaf_docs(cls: type[BaseModel], prefix: str, instance: Any) -> list[FieldDoc]:
    docs = []
    for name, field in cls.model_fields.items():
        sub = _section_class(field.annotation)
        value = getattr(instance, name, None)
        if sub is not None and value is not None:
            docs.append(FieldDoc(prefix + name, "section", "", field.description or ""))
            docs += _leaf_docs(sub, f"{prefix}{name}.", value)
            continue
        shown = json.dumps(value.model_dump(mode="json") if isinstance(value, BaseModel) else value, default=str)
        docs.append(FieldDoc(prefix + name, _type_name(field.annotation), shown, field.description or ""))
    return docs


def _type_name(annotation: Any) -> str:
    """A short readable type: ``int | None``, ``'k1' | 'k2'``, ``list[str]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))
