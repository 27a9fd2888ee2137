"""One command-line dialect for ``shiq-toy`` and ``shiq-llm``: every command is a dataclass of its options.

    @dataclass
    class GymArgs:
        out: Path = option(Path("figures"), "directory of the outputs", aliases=("output_dir",), path="out_dir")
        steps: int = option(400, "updates per run")

    COMMANDS = {"gym": Command("gym", (GymArgs,), run=gym.main, help="...", quick=QUICK)}
    sys.exit(run_cli("shiq-toy", COMMANDS, argv))

The parser of a command is a :class:`transformers.HfArgumentParser` over its dataclasses (as TRL's scripts):
both spellings of every option (``--num_completions`` and ``--num-completions``), the aliases of a field (pinned
or TRL names: ``--out`` and ``--output_dir``), ``--no_X`` for booleans that default to true, and the help of a
field from its ``metadata["help"]``, followed by its default. On top of it (:func:`resolve_options`):

- ``--config FILE.yaml``: keys are option names (either spelling, or an alias); the command line overrides the
  file (``KEY=VALUE`` items of a mapping option update the file's mapping: ``--train max_steps=2``). An unknown
  key or a value of the wrong type is a one-line :class:`OptionError` naming the key and the file.
- ``--quick`` (a command's ``quick`` preset): the preset changes only the options neither the command line nor
  the file set — explicit options always win.
- Validation before any work: options marked ``path=…`` are checked (an output that is a file, under a file, in a
  read-only folder, or an existing result without ``--overwrite``; an input that is missing or unreadable), then
  the command's own ``check``.

Errors are printed as one ``PROG: error: …`` line by :func:`run_cli` (status 2 for bad options; ``runtime_status``
for a ValueError of the work itself). transformers is imported only when a parser is built.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["option", "OptionError", "Command", "command_parser", "resolve_options", "run_cli", "coerce",
           "parse_key_values", "check_path", "apply_preset", "preset_values", "load_callable", "option_help"]

#: ``path=`` kinds of :func:`option`: checked by :func:`check_path` before a command starts.
PATH_KINDS = ("out_dir", "out_file", "in_file", "in_dir", "in_path", "rows", "data")
#: Suffixes of a local data file (a ``data`` path without one, that does not exist, is a hub name or a keyword).
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".csv")


class OptionError(ValueError):
    """A bad option, config key or path: printed as one line, exit status 2."""


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, aliases: Iterable[str] = (),
           choices: Iterable | None = None, path: str | None = None, metavar: str | None = None) -> Any:
    """A dataclass field with its help text and command-line metadata.

    ``aliases``: other names of the option (``"out"`` → ``--out`` and the YAML key ``out``; both spellings).
    ``choices``: the allowed values (of each item, for a tuple). ``path``: one of :data:`PATH_KINDS`, checked
    before the command runs (``rows``: a JSON Lines file of objects, read once to name a bad line; ``data``: the
    same when it names a local file, else a hub dataset or a named source).
    """
    if path is not None and path not in PATH_KINDS:
        raise ValueError(f"path must be one of {PATH_KINDS}, got {path!r}")
    metadata: dict[str, Any] = {"help": " ".join(help.split())}
    if aliases:
        metadata["aliases"] = tuple(aliases)
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if path is not None:
        metadata["path"] = path
    if metavar is not None:
        metadata["metavar"] = metavar
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------------------
# Values: YAML and presets
# --------------------------------------------------------------------------------------------------


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (" or null" if type(None) in args else "")
    if origin in (tuple, list):
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans", Path: "paths"}
        return f"a list of {plural.get(args[0], _type_name(args[0])) if args else 'values'}"
    if origin is dict or hint is dict:
        return "a mapping (key: value)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def coerce(value: Any, hint: Any, where: str, *, choices: Sequence | None = None) -> Any:
    """``value`` (from YAML or Python) as the type ``hint``; :class:`OptionError` ``"{where} must be …, got …"``.

    Strict where a silent conversion would hide a mistake (``betas: 0.1`` for a list, ``max_steps: ten``, a
    list for a mapping); numbers written as strings (``1e-5``, which YAML reads as a string) are accepted.
    Types this function does not know (unions of several types, classes) pass unchanged.
    """
    def bad() -> OptionError:
        return OptionError(f"{where} must be {_type_name(hint)}, got {value!r}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return coerce(value, rest[0], where, choices=choices)
        return value
    if origin is typing.Literal:
        choices = args
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad()
    if hint is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            result: Any = value
        elif isinstance(value, float) and value.is_integer():
            result = int(value)
        elif isinstance(value, str):
            try:
                result = int(value)
            except ValueError:
                raise bad() from None
        else:
            raise bad()
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad()
        try:
            result = float(value)
        except ValueError:
            raise bad() from None
    elif hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad()
        result = str(value)
    elif hint is Path:
        if not isinstance(value, (str, Path)):
            raise bad()
        result = Path(value)
    elif origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad()
        item = args[0] if args else Any
        result = [coerce(v, item, f"{where}[{i}]", choices=choices) for i, v in enumerate(value)]
        return tuple(result) if origin is tuple else result
    elif origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise bad()
        return dict(value)
    else:
        return value
    if choices is not None and result not in choices:
        raise OptionError(f"{where} must be one of {list(choices)}, got {value!r}")
    return result


def parse_key_values(items: Sequence[str] | str | Mapping | None, *, option: str) -> dict[str, Any]:
    """``["score=fine-grained_score", "chosen_reward=2"]`` → ``{"score": "fine-grained_score", "chosen_reward": 2}``.

    Each item is ``KEY=VALUE``, the value read as JSON when it parses (numbers, true/false, null, lists), else kept
    as a string; or a JSON object whose keys are added as they are. A mapping is returned as it is.
    ValueError naming ``option`` and the item that is neither.
    """
    if isinstance(items, Mapping):
        return dict(items)
    if isinstance(items, str):
        items = [items]
    options: dict[str, Any] = {}
    for item in items or ():
        if item.strip().startswith("{"):
            try:
                mapping = json.loads(item)
            except json.JSONDecodeError as error:
                raise OptionError(f"{option}: {item!r} is not a JSON object ({error.msg})") from None
            if not isinstance(mapping, dict):
                raise OptionError(f"{option}: {item!r} is not a JSON object")
            options.update(mapping)
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"{option} must be KEY=VALUE or a JSON object, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def preset_values(cls: type, preset: Any) -> dict[str, Any]:
    """The fields a preset sets: a mapping as it is, or the fields of an instance of ``cls`` that differ from
    the defaults."""
    if preset is None:
        return {}
    if isinstance(preset, Mapping):
        return dict(preset)
    default = cls()
    return {f.name: getattr(preset, f.name) for f in dataclasses.fields(cls)
            if getattr(preset, f.name) != getattr(default, f.name)}


def apply_preset(args: Any, preset: Any) -> Any:
    """``args`` with the preset's values for the fields still at their default (a ``quick`` budget given from
    Python: the fields set explicitly keep their values)."""
    default = type(args)()
    changes = {k: v for k, v in preset_values(type(args), preset).items() if getattr(args, k) == getattr(default, k)}
    return dataclasses.replace(args, **changes)


# --------------------------------------------------------------------------------------------------
# Paths and callables
# --------------------------------------------------------------------------------------------------


def _first_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_path(kind: str, value: Any, name: str, *, overwrite: bool | None = None) -> None:
    """OptionError naming ``name`` when the path ``value`` cannot serve as ``kind`` (:data:`PATH_KINDS`).

    Outputs: not a file where a folder is wanted (and the reverse), not under a file, in a writable folder; an
    existing output file only with ``overwrite`` (``overwrite=None``: the command has no such option and replaces
    it). Inputs: present, of the right kind and readable; ``rows``: JSON Lines objects, UTF-8 (file and line named).
    """
    if value is None or value == "":
        return
    path = Path(value)
    if kind in ("out_dir", "out_file"):
        ancestor = _first_existing(path)
        if ancestor != Path(os.path.abspath(path)) and not ancestor.is_dir():
            raise OptionError(f"{name} {value}: {ancestor} is a file, not a folder")
        if kind == "out_dir" and path.exists() and not path.is_dir():
            raise OptionError(f"{name} {value} is a file; give a folder")
        if kind == "out_file" and path.is_dir():
            raise OptionError(f"{name} {value} is a folder; give a file name")
        folder = path if kind == "out_dir" and path.is_dir() else ancestor if not path.exists() else path.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OptionError(f"{name} {value}: cannot write in {folder} (read-only)")
        unfinished = Path(f"{path}.parts").is_dir()  # a resumable job killed after OUT was swapped in
        if kind == "out_file" and path.is_file() and overwrite is False and not unfinished:
            raise OptionError(f"{name} {value} exists; give --overwrite to replace it")
        return
    if kind == "data":
        if not path.exists() and path.suffix not in DATA_SUFFIXES:
            return  # a hub dataset or a named source ('synthetic')
        kind = "rows"
    if kind in ("in_file", "rows") and "://" not in str(value):
        if not path.exists():
            raise OptionError(f"{name} {value}: no such file")
        if not path.is_file():
            raise OptionError(f"{name} {value} is not a file")
        if not os.access(path, os.R_OK):
            raise OptionError(f"{name} {value}: cannot read it (permission denied)")
        if kind == "rows" and path.suffix == ".jsonl":
            _check_rows(path, name)
        return
    if kind == "in_dir":
        if not path.is_dir():
            raise OptionError(f"{name} {value}: no such folder")
        if not os.access(path, os.R_OK | os.X_OK):
            raise OptionError(f"{name} {value}: cannot read it (permission denied)")
    if kind == "in_path" and path.exists() and not os.access(path, os.R_OK):
        raise OptionError(f"{name} {value}: cannot read it (permission denied)")


def _check_rows(path: Path, name: str) -> None:
    """Every non-empty line of a JSON Lines file is a JSON object, in UTF-8 (file and line named)."""
    with open(path, "rb") as handle:
        count = 0
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise OptionError(f"{name} {path}: line {number}: not UTF-8 text (byte {error.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise OptionError(f"{name} {path}: line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise OptionError(f"{name} {path}: line {number}: expected a JSON object (one row), got "
                                  f"{type(record).__name__}")
            count += 1
    if count == 0:
        raise OptionError(f"{name} {path}: no rows (the file is empty)")


def load_callable(spec: str, *, what: str = "target") -> Callable:
    """``module:function`` or ``path/to/file.py:function`` → the callable (``function`` may be dotted).

    The current folder is on the import path, as for ``python -m``; ValueError naming ``what`` and the spec when
    the module or the attribute cannot be found or is not callable. The one resolver of ``shiq-toy verify`` and
    the rewards of ``shiq-llm score``, ``evaluate`` and ``sweep``.
    """
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r} must be MODULE:FUNCTION (e.g. my_module:fn or path/to/file.py:fn)")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"{what} {spec}: file not found: {path}")
        try:
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        except Exception as error:  # the user's file: any error while importing it is named, in one line
            raise ValueError(f"{what} {spec}: cannot import {path} ({type(error).__name__}: {error})") from None
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # like python -m: modules of the current directory are importable
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise ValueError(f"{what} {spec}: cannot import module {module_name!r} ({error})") from None
        except Exception as error:
            raise ValueError(f"{what} {spec}: cannot import {module_name!r} ({type(error).__name__}: {error})") from None
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"{what} {spec}: {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"{what} {spec} is a {type(fn).__name__}, not a function")
    return fn


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


@dataclass
class Command:
    """One subcommand: its option dataclasses, what it runs and how it is checked.

    ``run(*instances)`` gets one instance per class of ``options`` and returns the exit status (None: 0).
    ``quick``: a preset (a mapping of fields to values, or an instance of ``options[0]``) that ``--quick`` lays
    under the explicit options; the first class's ``quick`` field is the flag when it has one (the instance then
    gets ``quick=False``: the preset is already applied), else ``--quick`` is added. ``check(*instances)``: the
    command's own validation (before any work; raise ValueError). ``overwrite``: the field that allows replacing
    an existing output file. ``choices``: allowed values of options (of each item for a tuple), beside those in
    the fields' metadata. ``positional``: the option that may also be given as the first argument. ``aliases``:
    other names of options, beside those in the fields' metadata (for classes the command does not own).
    ``check_source``: ``check`` also gets ``source=`` (the ``--config`` file, or "the command line") to name.
    """

    name: str
    options: tuple[type, ...]
    run: Callable[..., int | None]
    help: str = ""
    description: str = ""
    quick: Any = None
    check: Callable[..., None] | None = None
    overwrite: str = "overwrite"
    choices: Mapping[str, Sequence] = field(default_factory=dict)
    positional: str | None = None
    aliases: Mapping[str, Sequence[str]] = field(default_factory=dict)
    check_source: bool = False

    def choices_of(self, name: str) -> Sequence | None:
        """The allowed values of an option: the command's ``choices``, else its field's metadata."""
        return self.choices.get(name) or self.fields[name][1].metadata.get("choices")

    @property
    def fields(self) -> dict[str, tuple[type, dataclasses.Field]]:
        return {f.name: (cls, f) for cls in self.options for f in dataclasses.fields(cls) if f.init}

    @property
    def has_quick_field(self) -> bool:
        return self.quick is not None and "quick" in {f.name for f in dataclasses.fields(self.options[0])}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def _shown(value: Any) -> str:
    if value is MISSING:
        return "required"
    if isinstance(value, (tuple, list)):
        return "default: " + (" ".join(str(v) for v in value) if value else "none")
    if isinstance(value, dict):
        return "default: " + (json.dumps(value) if value else "none")
    return f"default: {value}"


def option_help(f: dataclasses.Field, text: str | None = None) -> str:
    """The help of a field on the command line: its ``metadata['help']`` (or ``text``) and its default (or
    'required')."""
    return f"{f.metadata.get('help', '') if text is None else text} ({_shown(_default_of(f))})".strip()


def _spellings(name: str) -> list[str]:
    return list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}", f"--{name.replace('-', '_')}"]))


@dataclass
class _Flags:
    quick: bool = option(False, "a reduced budget (the preset below); options given explicitly still win")


_PARSERS: dict[tuple[int, str], Any] = {}


def command_parser(command: Command, prog: str):
    """The ``transformers.HfArgumentParser`` of a command: one option per field (both spellings, aliases), the
    help with each default, ``--config FILE`` and, with a preset, ``--quick``. Every default is
    ``argparse.SUPPRESS`` so that the parsed namespace holds the explicit options only. Built once per command."""
    key = (id(command), prog)
    if key not in _PARSERS or _PARSERS[key][0] is not command:
        _PARSERS[key] = (command, _build_parser(command, prog))
    return _PARSERS[key][1]


def _build_parser(command: Command, prog: str):
    import argparse

    from transformers import HfArgumentParser

    class OptionsParser(HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, f):
            f = copy.copy(f)
            meta = dict(f.metadata)
            meta.pop("path", None)
            meta.pop("key_values", None)
            if command.choices.get(f.name):
                meta["choices"] = tuple(command.choices[f.name])
            if meta.get("choices"):
                meta.setdefault("metavar", f.name.upper())
                meta["help"] = f"{meta.get('help', '')} One of: {', '.join(map(str, meta['choices']))}."
            aliases = [s for a in (*meta.pop("aliases", ()), *command.aliases.get(f.name, ())) for s in _spellings(a)]
            if aliases:
                meta["aliases"] = [a for a in aliases if a not in _spellings(f.name)]
            meta["help"] = option_help(f, meta.get("help")).replace("%", "%%")
            origin = typing.get_origin(f.type)
            if origin in (tuple, list):  # items read as text, then split at commas and typed by coerce
                default = f.default
                f.type = list[str]
                meta.pop("choices", None)
                if default is not MISSING:
                    f.default, f.default_factory = MISSING, (lambda d=default: list(d))
            elif origin is dict or f.type is dict:
                f.type, f.default, f.default_factory = list[str], MISSING, list
                meta.setdefault("metavar", "KEY=VALUE")
                meta["action"] = "extend"
            f.metadata = types.MappingProxyType(meta)
            HfArgumentParser._parse_dataclass_field(parser, f)

    classes = list(command.options)
    if command.quick is not None and not command.has_quick_field:
        classes.append(_Flags)
    description = command.description or command.help
    if command.quick is not None:
        preset = preset_values(command.options[0], command.quick)
        description += "\n\n--quick sets: " + ", ".join(f"{k}={_shown(v)[9:]}" for k, v in preset.items())
    parser = OptionsParser(classes, prog=prog, description=description, allow_abbrev=False, add_help=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-h", "--help", action="store_true", default=argparse.SUPPRESS, help="show this help and exit")
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="YAML file of options (option names as keys); options given here override it")
    parser.error = _raise_option_error  # type: ignore[method-assign]
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = f"set --{action.dest} to false"
    return parser


def _raise_option_error(message: str):
    raise OptionError(message)


def resolve_options(command: Command, argv: Sequence[str], *, prog: str) -> list[Any]:
    """The instances of the command's option classes from the defaults, ``--quick``, ``--config`` and the command
    line (in that order of precedence, last wins), checked: OptionError naming the option, key, file or row."""
    parser = command_parser(command, prog)
    argv = list(argv)
    if command.positional and argv and not argv[0].startswith("-"):
        argv = [f"--{command.positional}", *argv]
    namespace, rest = parser.parse_known_args(argv)
    if rest:
        raise OptionError(f"unknown option {rest[0]!r} (see `{prog} --help`)")
    given = vars(namespace)
    given.pop("help", None)
    config_file = given.pop("config", None)
    fields = command.fields
    hints = {name: typing.get_type_hints(cls)[name] for name, (cls, _) in fields.items()}
    explicit: dict[str, Any] = {}
    for name, value in given.items():
        if name not in fields:
            explicit[name] = value
            continue
        hint, f = hints[name], fields[name][1]
        if _is_dict(hint):
            explicit[name] = parse_key_values(value, option=_spellings(name)[-1])
        elif typing.get_origin(hint) in (tuple, list) and isinstance(value, list):
            items = [part.strip() for item in value for part in str(item).split(",") if part.strip()]
            explicit[name] = coerce(items, hint, f"option --{name}", choices=command.choices_of(name))
        else:
            explicit[name] = coerce(value, hint, f"option --{name}", choices=command.choices_of(name))
    from_file = _config_values(Path(config_file), command, hints) if config_file is not None else {}
    for name, value in explicit.items():  # KEY=VALUE items on the command line update a mapping of the file
        if isinstance(value, dict) and isinstance(from_file.get(name), dict):
            explicit[name] = {**from_file[name], **value}
    quick = bool(explicit.get("quick", from_file.get("quick", False)))
    values = {**(preset_values(command.options[0], command.quick) if quick else {}), **from_file, **explicit}
    if command.has_quick_field:
        values["quick"] = False
    else:
        values.pop("quick", None)
    missing = [name for name, (_, f) in fields.items() if _default_of(f) is MISSING and name not in values]
    if missing:
        raise OptionError(f"missing option --{missing[0]}" + (f" (nor key {missing[0]!r} in {config_file})"
                                                              if config_file else ""))
    instances = []
    for cls in command.options:
        own = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.init and f.name in values}
        try:
            instances.append(cls(**own))
        except OptionError:
            raise
        except (ValueError, TypeError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise OptionError(_from_file(message, from_file, config_file)) from None
    overwrite = bool(values.get(command.overwrite, False)) if command.overwrite in fields else None
    for name, (_, f) in fields.items():
        kind = f.metadata.get("path")
        if kind is not None:
            value = next(getattr(i, name) for i in instances if hasattr(i, name))
            check_path(kind, value, _spellings(name)[-1], overwrite=overwrite)
    if command.check is not None:
        try:
            if command.check_source:
                command.check(*instances, source=f"config file {config_file}" if config_file else "the command line")
            else:
                command.check(*instances)
        except OptionError:
            raise
        except ValueError as error:
            raise OptionError(_from_file(str(error), from_file, config_file)) from None
    return instances


def _from_file(message: str, from_file: Mapping[str, Any], config_file: str | None) -> str:
    """``message``, followed by the config file when it names one of the file's keys (a bad value of the file)."""
    if config_file and str(config_file) not in message and any(
            f"'{k}'" in message or f"--{k}" in message or message.startswith(f"{k} ") for k in from_file):
        return f"{message} (in config file {config_file})"
    return message


def _is_dict(hint: Any) -> bool:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    return typing.get_origin(hint) is dict or hint is dict


def _config_values(path: Path, command: Command, hints: dict) -> dict[str, Any]:
    """The options of a ``--config`` YAML file, each checked against its field's type (key and file named)."""
    import yaml

    if not path.is_file():
        raise OptionError(f"--config {path}: no such file")
    try:
        loaded = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise OptionError(f"cannot read config file {path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise OptionError(f"cannot read config file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise OptionError(f"cannot read config file {path}: {where}not valid YAML ({getattr(error, 'problem', None) or error})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise OptionError(f"config file {path} must hold a mapping of option names to values, got "
                          f"{type(loaded).__name__}")
    fields = command.fields
    names = {}
    for name, (_, f) in fields.items():
        for alias in (name, *f.metadata.get("aliases", ()), *command.aliases.get(name, ())):
            names[alias.replace("-", "_")] = name
    names["quick"] = "quick"
    values: dict[str, Any] = {}
    for key, value in loaded.items():
        name = names.get(str(key).replace("-", "_"))
        where = f"config file {path}: key {key!r}"
        if name is None:
            raise OptionError(f"config file {path}: unknown key {key!r} (the keys are the command's option names, "
                              "see --help)")
        if name == "quick":
            values[name] = coerce(value, bool, where)
            continue
        hint = hints[name]
        if value is None:
            if type(None) in typing.get_args(hint):
                values[name] = None
            continue  # an empty key of an option that cannot be None: its default
        if fields[name][1].metadata.get("key_values") or _is_dict(hint):
            if not isinstance(value, (Mapping, list, str)) or (isinstance(value, list) and not all(
                    isinstance(v, str) for v in value)):
                raise OptionError(f"{where} must be a mapping (key: value), got {value!r}")
            value = parse_key_values(value, option=where)
            values[name] = value if _is_dict(hint) else [json.dumps(value)]
            continue
        values[name] = coerce(value, hint, where, choices=command.choices_of(name))
    return values


def _overview(prog: str, description: str, commands: Mapping[str, Command], prefix: str = "") -> str:
    lines = [f"usage: {prog} {prefix}COMMAND [options]   ({prog} {prefix}COMMAND --help: every option, with its default)",
             "", description, "", "commands:"]
    width = max(len(n) for n in commands)
    lines += [f"  {name.removeprefix(prefix):<{width}}  {c.help}" for name, c in commands.items() if name.startswith(prefix)]
    return "\n".join(lines)


def run_cli(prog: str, commands: Mapping[str, Command], argv: Sequence[str] | None = None, *, description: str = "",
            runtime_status: int = 1, runtime_errors: tuple[type[BaseException], ...] = (ValueError,),
            error_prefix: Callable[[str], str] | None = None) -> int:
    """Run the command ``argv`` names (one word, or two for a group such as ``experiment multiturn``); returns the
    exit status. Option errors: one line, status 2; ``runtime_errors`` of the work: one line, ``runtime_status``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prefix = error_prefix or (lambda name: prog)
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview(prog, description, commands), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name = " ".join(argv[:2]) if " ".join(argv[:2]) in commands else argv[0]
    if name not in commands:
        group = [n for n in commands if n.startswith(argv[0] + " ")]
        if group and (len(argv) == 1 or argv[1] in ("-h", "--help")):
            print(_overview(prog, description, commands, prefix=argv[0] + " "))
            return 0 if len(argv) > 1 else 2
        known = [n.split()[-1] for n in group] if group else sorted({n.split()[0] for n in commands})
        print(f"{prefix(argv[0])}: error: unknown command {' '.join(argv[:2 if group else 1])!r}; one of: "
              f"{', '.join(known)}", file=sys.stderr)
        return 2
    command = commands[name]
    rest = argv[len(name.split()):]
    full = f"{prog} {name}"
    if "-h" in rest or "--help" in rest:
        command_parser(command, full).print_help()
        return 0
    try:
        instances = resolve_options(command, rest, prog=full)
    except OptionError as error:
        print(f"{prefix(name)}: error: {error}", file=sys.stderr)
        return 2
    try:
        return int(command.run(*instances) or 0)
    except runtime_errors as error:
        print(f"{prefix(name)}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return runtime_status
