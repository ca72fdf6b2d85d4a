"""Typed settings: each component declares its settings as a dataclass, the one source of its defaults.

:func:`parse_settings` turns a plain mapping (a config section, checkpoint hyper-parameters) into
such a dataclass, recursing into nested dataclass fields, and rejects what the dataclass does not
declare: an unknown key names the nearest valid one, a value of the wrong type names the key and
the expected type. Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``,
``Optional[...]``, ``Union[...]`` of these, ``tuple[float, ...]`` pairs, ``list``, ``dict`` / ``Any`` (taken
as is) and nested dataclasses. No dependency beyond the standard library, so it works where
OmegaConf is not installed (the GPU machine).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal, Mapping, Union


class SettingsError(ValueError):
    """A settings mapping that does not fit its dataclass; the message names the key and the fix.

    ``key``: the dotted key at fault (empty when the whole section is).
    """

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


def setting_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a settings dataclass accepts, nested ones included (``["net", "net.features", ...]``)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        keys.append(f"{prefix}{field.name}")
        if dataclasses.is_dataclass(hints[field.name]):
            keys += setting_keys(hints[field.name], f"{prefix}{field.name}.")
    return keys


def unknown_key_error(key: str, valid: list[str], where: str) -> SettingsError:
    """The error for a key that is not in ``valid``, suggesting the nearest valid keys."""
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(valid)}"
    return SettingsError(f"unknown config key '{key}' in {where}{hint}", key=key)


def parse_settings(cls: type, values: Mapping[str, Any] | None, prefix: str = "", where: str = "settings") -> Any:
    """An instance of the settings dataclass ``cls`` from ``values`` (missing keys take the defaults).

    ``prefix`` is the dotted path of ``values`` in the whole config (``"model."``), used in messages;
    ``where`` names the source (a file, "command-line overrides", a checkpoint).
    """
    if isinstance(values, cls):
        return values
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    names = [field.name for field in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise unknown_key_error(f"{prefix}{key}", setting_keys(cls, prefix), where)
    parsed = {}
    for name in names:
        if name in values:
            parsed[name] = _convert(values[name], hints[name], f"{prefix}{name}", where)
    try:
        return cls(**parsed)
    except SettingsError:
        raise
    except (ValueError, TypeError) as error:  # a dataclass's own __post_init__ checks
        raise SettingsError(f"invalid settings under '{prefix.rstrip('.') or cls.__name__}' in {where}: {error}",
                            key=prefix.rstrip(".")) from None


def settings_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass as plain nested dicts and lists (YAML-, JSON- and checkpoint-safe)."""

    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(settings))


def check_value(value: Any, annotation, key: str, where: str = "settings") -> Any:
    """``value`` checked against a type annotation from outside this suite (e.g. ``pl.Trainer``'s).

    Annotations built from the supported types are checked (and numbers converted); others (a class
    of the library's own, ``list[int]``) accept any value and leave the check to the library.
    """
    return _convert(value, annotation, key, where) if _supported(annotation) else value


def _supported(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (Union, tuple):
        return all(_supported(a) for a in typing.get_args(annotation))
    return origin is Literal or annotation in (bool, int, float, str, type(None))


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " or ".join(repr(v) for v in typing.get_args(annotation))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is tuple:
        return f"a list of {len(typing.get_args(annotation))} numbers"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _convert(value: Any, annotation, key: str, where: str) -> Any:
    """``value`` checked (and, for numbers and pairs, converted) against ``annotation``."""
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is dict or origin is dict:
        return value
    if annotation is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise SettingsError(f"config key '{key}' in {where} must be a list, got {value!r}", key=key)
    if dataclasses.is_dataclass(annotation):
        if value is not None and not isinstance(value, Mapping):  # None: the section's defaults
            raise SettingsError(f"config key '{key}' in {where} must be a section of settings, got {value!r}", key=key)
        return parse_settings(annotation, value, f"{key}.", where)
    if origin is Union:
        for option in typing.get_args(annotation):
            try:
                return _convert(value, option, key, where)
            except SettingsError:
                continue
    elif origin is Literal:
        if value in typing.get_args(annotation):
            return value
    elif origin is tuple:
        args = typing.get_args(annotation)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_convert(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
    elif annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"settings field {key} has an unsupported type {annotation!r}")
    raise SettingsError(f"config key '{key}' in {where} must be {_type_name(annotation)}, got {value!r}", key=key)
