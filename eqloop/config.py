"""The config base of every eqloop config, and how files and ``key=value`` overrides are read.

:class:`ConfigBase` gives every config dataclass (``LoopLMConfig``, ``SolveConfig``,
``TrainConfig``, ``FinetuneConfig``, ``LoraOptions``, ``TuneConfig``) its ``to_dict`` /
``from_dict``, the one unknown-keys error and the section rule.

Shared by every eqloop command that takes ``--config FILE`` and ``--set KEY=VALUE``;
:func:`load_config_data` is the one way they read a config::

    data = load_config_data(TrainConfig().to_dict(), "run.toml", ["resume=no"], schema=TrainConfig)

It reads the file (JSON, or TOML by the ``.toml`` suffix; :func:`read_config_file`), merges
it into the defaults by one rule (:func:`merge_config`: a config-dataclass section such as
``model`` is updated entry by entry, any other value replaces the default whole) and then
applies the ``--set`` overrides (:func:`apply_overrides`: a dotted key sets one entry at any
depth).

With a ``schema`` (a config dataclass), each value is parsed by its field's type hint
(:func:`parse_value`): booleans from true/false, yes/no, on/off, 1/0; tuples and lists from
comma-separated items or a JSON array; dicts from a JSON object; the choices of a
``Literal`` field by name (``pruner=none`` is the choice "none", not null); ``None`` from
``null`` where the type allows it. Unknown keys and text that does not fit are errors
naming the field. Importing this module does not import torch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, TypeVar

__all__ = [
    "CONFIG_FORMATS",
    "ConfigBase",
    "add_config_arguments",
    "apply_overrides",
    "check_keys",
    "config_section",
    "field_types",
    "load_config_data",
    "merge_config",
    "parse_value",
    "read_config_file",
    "register_type_names",
]

CONFIG_FORMATS: dict[str, str] = {".json": "JSON", ".toml": "TOML"}
"""Config file formats read, by file suffix (any other suffix is read as JSON)."""

_TYPE_NAMES: dict[type, Callable[[], dict[str, Any]]] = {}


def register_type_names(cls: type, names: Callable[[], dict[str, Any]]) -> None:
    """Tell :func:`apply_overrides` how to resolve names in ``cls``'s type hints.

    Config modules that import a field's type lazily (to stay cheap) register a function
    returning ``{"TypeName": the_type}``; it is called only when overrides are parsed.
    """
    _TYPE_NAMES[cls] = names


def add_config_arguments(parser: argparse.ArgumentParser, *, file_help: str, example: str) -> None:
    """Add the ``--config FILE`` and repeatable ``--set KEY=VALUE`` options to a CLI.

    Args:
        parser: the (sub)command's parser; ``--set`` values land in ``overrides``.
        file_help: help text of ``--config``.
        example: example overrides shown in the help of ``--set``.
    """
    parser.add_argument("--config", type=Path, help=file_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field; the value is read by the field's type (true/false, yes/no, "
        "on/off, 1/0 for booleans; comma-separated items or a JSON array for lists; a JSON "
        f"object for dicts); dotted keys reach nested fields, e.g. {example}",
    )


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of every field of a config dataclass (ClassVars excluded).

    Names that ``cls``'s module imports lazily are resolved by the function registered
    with :func:`register_type_names`.
    """
    names = _TYPE_NAMES[cls]() if cls in _TYPE_NAMES else {}
    hints = typing.get_type_hints(cls, localns=names)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _json_or_text(text: str) -> Any:
    """JSON if it parses (numbers, booleans, lists, objects, null), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_value(name: str, kind: Any, text: str) -> Any:
    """Parse the text of a ``key=value`` override by the type of the field it sets.

    Args:
        name: the field, for error messages.
        kind: its type (``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None``,
            ``tuple[...]``, ``list[...]``, ``dict[...]``, a dataclass) or ``None``/``Any``
            for free-form values, which are read as JSON if they parse, else as text.
        text: what the user wrote after ``=``.

    Returns:
        The value in the field's type: booleans from true/false, yes/no, on/off, 1/0;
        tuples and lists from JSON arrays or comma-separated items; dicts and dataclasses
        from JSON objects; a ``Literal`` choice from the word that names it (before
        ``None``: ``none`` is the choice ``"none"`` where that is one); ``None`` from
        ``null`` or ``none`` where the type allows it; strings as written (a JSON string
        literal is unquoted).

    Raises:
        ValueError: text that does not fit the type.
    """
    text = text.strip()
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is None or kind is Any:
        return _json_or_text(text)
    if origin in (typing.Union, types.UnionType):
        (inner, *more) = [a for a in args if a is not type(None)]
        if not more and typing.get_origin(inner) is typing.Literal:
            choice = _literal_choice(inner, text)
            if choice is not None:  # a word naming a choice is that choice ("none"), not null
                return choice
        if type(None) in args and text.lower() in ("null", "none"):
            return None
        return parse_value(name, inner if not more else None, text)
    if origin is typing.Literal:
        choice = _literal_choice(kind, text)
        if choice is None:
            listed = ", ".join(repr(c) for c in args)
            raise ValueError(f"{name} must be one of {listed}; got {text!r}")
        return choice
    if kind is bool:
        from solvers.checks import parse_bool  # here: the solvers package imports torch

        return parse_bool(name, text)
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"{name} must be {what}, got {text!r}") from None
    if kind is str:
        value = _json_or_text(text) if text.startswith('"') else text
        return value if isinstance(value, str) else text
    if origin in (tuple, list):
        return _parse_sequence(name, origin, args, text)
    if origin is dict or kind is dict or dataclasses.is_dataclass(kind):
        value = _json_or_text(text)
        if not isinstance(value, dict):
            raise ValueError(f'{name} must be a JSON object like {{"key": value}}, got {text!r}')
        return value
    return _json_or_text(text)


def _literal_choice(kind: Any, text: str) -> Any:
    """The choice of the ``Literal[...]`` type ``kind`` that ``text`` names (as written or
    as a JSON string literal), else None."""
    word = _json_or_text(text) if text.startswith('"') else text
    return next((c for c in typing.get_args(kind) if str(c) == word), None)


def _parse_sequence(name: str, origin: type, args: tuple[Any, ...], text: str) -> Any:
    """A tuple or list from a JSON array or comma-separated items, each parsed by type."""
    if text.startswith("["):
        items = _json_or_text(text)
        if not isinstance(items, list):
            raise ValueError(f"{name} must be a JSON array or comma-separated values, got {text!r}")
    else:
        items = [part for part in (p.strip() for p in text.split(",")) if part] if text else []
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(items) != len(args):
            example = ",".join(["0.9", "0.98"][: len(args)]) if args[0] is float else "..."
            raise ValueError(
                f"{name} takes {len(args)} comma-separated values (e.g. {example}), got {text!r}"
            )
        kinds = list(args)
    else:
        kinds = [args[0] if args else None] * len(items)
    parsed = [
        parse_value(f"{name}[{i}]", k, item) if isinstance(item, str) else item
        for i, (k, item) in enumerate(zip(kinds, items, strict=True))
    ]
    return tuple(parsed) if origin is tuple else parsed


def _child_type(kind: Any, key: str, path: str) -> Any:
    """The type of entry ``key`` of a value of type ``kind`` (None: free-form)."""
    if kind is None or kind is Any:
        return None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _child_type(inner[0], key, path) if len(inner) == 1 else None
    if dataclasses.is_dataclass(kind):
        known = field_types(kind)
        check_keys([key], known, kind=kind.__name__, within=path)
        return known[key]
    if origin is dict:
        return args[1] if len(args) == 2 else None
    raise ValueError(f"{path or key} is not a dict, so {path}.{key} cannot be set")


def apply_overrides(
    data: dict[str, Any], overrides: Iterable[str], *, schema: type | None = None
) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a config dict; dotted keys reach nested dicts.

    Args:
        data: the config as a dict (e.g. ``TrainConfig().to_dict()``).
        overrides: ``key=value`` strings, e.g. ``lam=0.1``, ``resume=no``,
            ``eval_loops=1,4,16``, ``depth={"kind":"fixed","t":8}``, ``model.d_model=64``.
        schema: the config dataclass; each value is then parsed by the type of its field
            (:func:`parse_value`) and unknown keys are errors. Without it, values are
            read as JSON when they parse, else as text.

    Returns:
        A new dict; ``data`` is not modified.

    Raises:
        ValueError: an override without ``=``, an unknown key, a value that does not fit
            its field, or a dotted key whose parent is not a dict.
    """
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like key=value")
        *parents, leaf = key.strip().split(".")
        node, kind, path = out, schema, ""
        for part in parents:
            kind = _child_type(kind, part, path)
            path = f"{path}.{part}" if path else part
            child = node.setdefault(part, {})
            if child is None and any(map(dataclasses.is_dataclass, typing.get_args(kind))):
                child = node[part] = {}  # an unset optional section: its fields' defaults
            if dataclasses.is_dataclass(child) and not isinstance(child, type):
                child = node[part] = asdict(child)
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {path} is not a dict")
            node = child
        kind = _child_type(kind, leaf, path)
        node[leaf] = parse_value(key.strip(), kind, text)
    return out


# ------------------------------------------------------------------------------- files


def _read_toml(file: Path) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ValueError(f"reading {file} needs Python >= 3.11 (tomllib); use JSON") from None
    return tomllib.loads(file.read_text())


def read_config_file(
    path: str | os.PathLike[str], valid: Mapping[str, Any], *, kind: str
) -> dict[str, Any]:
    """The top-level object of a config file, checked against the valid keys.

    Args:
        path: a JSON file, or TOML by the ``.toml`` suffix (:data:`CONFIG_FORMATS`).
        valid: the defaults; only their keys may appear in the file.
        kind: the config's name in the unknown-keys message (``"TrainConfig"``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a format that is not read (e.g. YAML), an unreadable file, not an
            object, or unknown keys.
    """
    file = Path(path)
    read = " and ".join(f"{f} ({s})" for s, f in CONFIG_FORMATS.items())
    if not file.is_file():
        raise FileNotFoundError(f"no such config file: {file}")
    if file.suffix.lower() in (".yaml", ".yml", ".ini", ".cfg"):
        raise ValueError(
            f"cannot read config file {file}: its format is not read; eqloop reads {read}"
        )
    is_toml = file.suffix.lower() == ".toml"
    try:
        loaded = _read_toml(file) if is_toml else json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # JSON/TOML decode errors are ValueErrors
        as_format = "TOML" if is_toml else "JSON"
        raise ValueError(
            f"cannot parse config file {file} as {as_format} ({err}); eqloop reads {read}"
        ) from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {file} must hold an object/table")
    check_keys(loaded, valid, kind=kind, where=str(file))
    return loaded


def check_keys(
    given: Iterable[str], valid: Iterable[str], *, kind: str, where: str = "", within: str = ""
) -> None:
    """Raise the one unknown-keys error of eqloop's configs, naming the keys and the valid ones.

    The message reads ``unknown <kind> keys[ in <where>]: [...][ (in <within>)]; valid keys
    are [...]``.

    Args:
        given: the keys the user wrote.
        valid: the keys the config takes.
        kind: the config's name (``"TrainConfig"``).
        where: the file or section the keys came from (``"run.toml"``, ``"model of base"``).
        within: the dotted path of the section a ``--set`` key was under (``"model"``).

    Raises:
        ValueError: a key of ``given`` that is not in ``valid``.
    """
    valid = set(valid)
    unknown = sorted(set(given) - valid)
    if unknown:
        origin = f" in {where}" if where else ""
        inside = f" (in {within})" if within else ""
        raise ValueError(
            f"unknown {kind} keys{origin}: {unknown}{inside}; valid keys are {sorted(valid)}"
        )


def config_section(kind: Any) -> type | None:
    """The config dataclass a field of type ``kind`` holds (``X`` or ``X | None``), else None."""
    options = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    if len(options) == 1 and dataclasses.is_dataclass(options[0]):
        return typing.cast(type, options[0])
    return None


def merge_config(
    data: Mapping[str, Any], update: Mapping[str, Any], *, schema: type, where: str
) -> dict[str, Any]:
    """``data`` updated with ``update`` by the one merge rule of eqloop's config files.

    A key whose field is a config dataclass (``TrainConfig.model``, ``FinetuneConfig.lora``)
    is a section: ``update``'s entries update the section's own, recursively, so a file
    sets ``model.d_model`` without repeating the other model fields (an unset optional
    section starts from its defaults; null switches an optional section off, as
    ``to_dict()`` writes it). Any other value, a dict such as ``depth`` included, replaces
    the current one whole. (A dotted ``--set`` key sets one entry at any
    depth instead: :func:`apply_overrides`.)

    Args:
        data: the config as a dict (e.g. ``TrainConfig().to_dict()``).
        update: the keys to set, e.g. a config file's contents.
        schema: the config dataclass ``data`` describes.
        where: what ``update`` is, for messages (a file name, ``"base"``).

    Returns:
        A new dict; neither argument is modified.

    Raises:
        ValueError: a key that is not a field of ``schema`` (the valid ones are listed).
        TypeError: ``update`` or a section in it is not an object/table.
    """
    if not isinstance(update, Mapping):
        raise TypeError(f"{where} must be an object/table, got {update!r}")
    kinds = field_types(schema)
    check_keys(update, kinds, kind=schema.__name__, where=where)
    out = copy.deepcopy(dict(data))
    for key, value in update.items():
        section = config_section(kinds[key])
        optional = type(None) in typing.get_args(kinds[key])
        if section is None or (value is None and optional):  # null: an optional section off
            out[key] = copy.deepcopy(value)
            continue
        current = out.get(key)
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            current = asdict(current)
        out[key] = merge_config(current or {}, value, schema=section, where=f"{key} of {where}")
    return out


def load_config_data(
    defaults: Mapping[str, Any],
    path: str | os.PathLike[str] | None,
    overrides: Iterable[str],
    *,
    schema: type,
    values: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A config as a dict: ``defaults``, then the file at ``path``, then ``overrides``, then
    ``values``.

    The one loader of the ``train``, ``finetune`` and ``tune`` commands (see the module
    docstring).

    Args:
        defaults: the config's defaults as a dict (e.g. ``TrainConfig().to_dict()``).
        path: a JSON or (by the ``.toml`` suffix) TOML file, or None.
        overrides: ``key=value`` strings (:func:`apply_overrides`).
        schema: the config dataclass; the file's and the overrides' keys are checked
            against it, the overrides' values parsed by its field types.
        values: typed values applied last, by the file's merge rule (the command line's
            own flags, :func:`eqloop.training.flags.flag_values`; ``{"lora": {}}`` switches
            a section on with its defaults unless the config already sets it).

    Returns:
        A new dict (not yet validated: the config's ``from_dict`` does that).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unreadable file, unknown keys or values that do not fit.
        TypeError: a section of the file that is not an object/table.
    """
    data = copy.deepcopy(dict(defaults))
    if path is not None:
        loaded = read_config_file(path, data, kind=schema.__name__)
        data = merge_config(data, loaded, schema=schema, where=str(path))
    data = apply_overrides(data, overrides, schema=schema)
    return merge_config(data, values or {}, schema=schema, where="the command-line flags")


_Config = TypeVar("_Config", bound="ConfigBase")


def _jsonable(value: Any) -> Any:
    """``value`` with every tuple turned into a list, through nested dicts and lists."""
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


class ConfigBase:
    """The base of every eqloop config dataclass (model, train, solve, finetune, LoRA, tune).

    A subclass is a ``@dataclass`` (a comment per field) with a ``validate`` method that
    checks every field and raises ``TypeError``/``ValueError`` naming it. It gets:

    - :meth:`from_dict`: missing keys take their defaults, unknown keys are one
      ``ValueError`` naming them and the valid keys, and the result is validated;
    - :meth:`to_dict`: every field as a JSON-serialisable dict (nested configs as dicts,
      tuples as lists), which :meth:`from_dict` reads back;
    - on construction, a field holding a config (``X`` or ``X | None``, a *section* such as
      ``TrainConfig.model``) given as a dict becomes that config through its ``from_dict``;
      a ``tuple[...]`` field given as a list becomes a tuple, a ``list[...]`` field given as
      a tuple a list (as JSON and TOML files give them);
    - ``class C(ConfigBase, type_names=f)``: ``f()`` returns ``{"TypeName": type}`` for the
      types the module imports lazily and the field hints name
      (:func:`eqloop.config.register_type_names`), so ``--set`` values are parsed by
      type.

    Files and ``--set`` overrides are read by :func:`eqloop.config.load_config_data`.
    """

    config_name: ClassVar[str] = ""  # the name unknown-key errors use ("": the class name)

    def __init_subclass__(
        cls, *, type_names: Callable[[], dict[str, Any]] | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if type_names is not None:
            register_type_names(cls, type_names)

    def __post_init__(self) -> None:
        """Turn dict sections into their configs and lists/tuples into the field's type."""
        for name, kind in field_types(type(self)).items():
            value = getattr(self, name)
            section = config_section(kind)
            origin = typing.get_origin(kind)
            if section is not None and isinstance(value, Mapping):
                setattr(self, name, typing.cast(type[ConfigBase], section).from_dict(value))
            elif origin is tuple and isinstance(value, list):
                setattr(self, name, tuple(value))
            elif origin is list and isinstance(value, tuple):
                setattr(self, name, list(value))

    def validate(self, **options: Any) -> Any:
        """Check every field (each subclass defines it; ``options`` are its own)."""
        raise NotImplementedError(f"{type(self).__name__} must define validate()")

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict (nested configs as dicts, tuples as lists)."""
        return typing.cast(dict[str, Any], _jsonable(asdict(typing.cast(Any, self))))

    @classmethod
    def from_dict(cls: type[_Config], data: Mapping[str, Any], **options: Any) -> _Config:
        """Build and validate a config; missing keys take their defaults.

        Args:
            data: config fields (a section may be given as a dict).
            **options: passed to ``validate`` (e.g. ``complete`` of FinetuneConfig).

        Raises:
            ValueError: unknown keys (they and the valid keys are listed) or invalid values.
            TypeError: values of the wrong type.
        """
        known = [f.name for f in dataclasses.fields(typing.cast(Any, cls))]
        check_keys(data, known, kind=cls.config_name or cls.__name__)
        config = cls(**copy.deepcopy(dict(data)))
        config.validate(**options)
        return config
