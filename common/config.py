"""Typed, frozen config dataclasses: JSON in and out, strict keys, overrides by name."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def to_dict(cfg) -> dict:
    """Dataclass -> plain dict (tuples become lists, as JSON would)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dumps(data: Mapping[str, Any]) -> str:
    """THE layout of the project's JSON config files (sorted keys, 2-space indent, final newline):
    equal settings give byte-equal files."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def to_json(cfg) -> str:
    return dumps(to_dict(cfg))


def _coerce(tp, value):
    origin = typing.get_origin(tp)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):  # `T | None`: read as T
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _coerce(args[0], value)
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return from_dict(tp, value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        return tuple(_coerce(a, v) for a, v in zip(args, value))
    if tp in (int, float, str, bool):
        if tp is bool and isinstance(value, str):
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        return tp(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build `cls` from a mapping; an unknown key is an error (no silent typos)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(hints[k], v) for k, v in data.items()})


def from_json(cls: type[T], text: str) -> T:
    return from_dict(cls, json.loads(text))


def override(cfg: T, **changes) -> T:
    """A copy of `cfg` with the given fields changed (None values are ignored)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return from_dict(type(cfg), {**dataclasses.asdict(cfg), **changes})


def save(cfg, path: str) -> None:
    """Write the config as JSON to a local path or `gs://` URL, atomically."""
    from common import storage

    storage.write_text(path, to_json(cfg))


def load(cls: type[T], path: str) -> T:
    from common import storage

    return from_json(cls, storage.read_text(path))


def positive_int(text: str) -> int:
    """An argparse `type=` for counts that must be >= 1 (a clear error otherwise)."""
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# --- command lines derived from a config dataclass ------------------------------------------
#
# One flag per field, `--kebab-name`, whose help is the field's comment in the class source:
#
#     @dataclass(frozen=True)
#     class Cfg:
#         size: int = 64  # tile side, px
#
#     add_arguments(parser, Cfg, defaults=PRESETS["default"])   # --size N: "tile side, px (default: 64)"
#     cfg = from_args(Cfg, parser.parse_args(argv), base=PRESETS[args.preset])
#
# Flags default to "not given" (argparse.SUPPRESS), so `from_args` applies only the options the
# user typed on top of the preset, and the dataclass validates the result.


def field_help(cls) -> dict[str, str]:
    """Field name -> its comment in the class source: the comment lines directly above the field
    (no blank line between), then its trailing `# comment`. Base classes first, then overrides."""
    import ast
    import inspect
    import textwrap

    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            lines, _ = inspect.getsourcelines(klass)
        except (OSError, TypeError):  # no source (e.g. built in a REPL): no help text
            continue
        source = textwrap.dedent("".join(lines))
        text = source.splitlines()
        tree = ast.parse(source)
        for node in tree.body[0].body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            parts = []
            i = node.lineno - 2  # 0-based index of the line above the field
            above = []
            while i >= 0 and text[i].strip().startswith("#"):
                above.insert(0, text[i].strip().lstrip("#").strip())
                i -= 1
            parts += above
            last = text[node.end_lineno - 1]
            trailing = _trailing_comment(last)
            if trailing:
                parts.append(trailing)
            if parts:
                helps[node.target.id] = " ".join(p for p in parts if p)
    return helps


def _trailing_comment(line: str) -> str:
    """The `# comment` ending a line of code ('' if none); '#' inside strings is not one."""
    import io
    import tokenize

    try:
        for tok in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline):
            if tok.type == tokenize.COMMENT:
                return tok.string.lstrip("#").strip()
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass
    return ""


def flag_name(field_name: str) -> str:
    """`shard_mb` -> `--shard-mb`."""
    return "--" + field_name.replace("_", "-")


def _show(value) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def add_arguments(parser, cls, *, defaults=None, skip=(), positional=(), required=(),
                  types: Mapping[str, Any] | None = None, choices: Mapping[str, Any] | None = None,
                  metavars: Mapping[str, str] | None = None, flags: Mapping[str, str] | None = None,
                  false_flags: Mapping[str, str] | None = None,
                  helps: Mapping[str, str] | None = None, exclusive=()):
    """Add one argument per field of the dataclass `cls` to an argparse parser (or group).

    - name: `--kebab-name` (`flags={"field": "--other"}` renames one); `positional` fields are
      positional arguments instead; `skip` fields get no argument.
    - help: the field's comment in the class source (see `field_help`), or `helps[field]`, then
      "(default: X)" with X from `defaults` (a preset instance; else the field's default). Empty
      strings and tuples, False and the defaults of `required` fields are not shown.
    - type: int, float, str from the annotation (`T | None` as T; `types={"field": positive_int}`
      replaces it; any other type is read as str); `Literal["a", "b"]` gives the choices;
      `tuple[T, ...]` is repeatable (`--x A --x B`, action="append"); `tuple[T, T]` takes
      exactly 2 values; `choices` and `metavars` as in argparse.
    - bool: `--x` (store_true) where the default is False, else `--x/--no-x`
      (BooleanOptionalAction). `false_flags={"field": "--keep-x"}` instead adds one flag that
      sets the field to False.
    - exclusive: groups of fields whose flags exclude each other, e.g.
      `exclusive=(("sample_submission", "labels"),)` (argparse's mutually exclusive group);
      a field of a group named in `required` makes the group required (exactly one of its
      flags must be given) instead of that field.
    - default: not given. The namespace then holds only the options the user typed (plus
      positionals), so `from_args` changes only those fields of its base.
    Returns the parser.
    """
    import argparse

    types, choices, metavars = dict(types or {}), dict(choices or {}), dict(metavars or {})
    flags, false_flags, helps_over = dict(flags or {}), dict(false_flags or {}), dict(helps or {})
    known = {f.name for f in dataclasses.fields(cls)}
    named = set(skip) | set(positional) | set(required) | set(types) | set(choices) | set(metavars)
    named |= set(flags) | set(false_flags) | set(helps_over)
    grouped = [name for group in exclusive for name in group]
    unknown = sorted((named | set(grouped)) - known)
    if unknown:
        raise ValueError(f"add_arguments({cls.__name__}): not fields: {unknown}")
    if len(set(grouped)) < len(grouped) or set(grouped) & (set(positional) | set(skip)):
        raise ValueError(f"add_arguments({cls.__name__}): a field in two exclusive groups, or one "
                         f"that is positional or skipped: {list(exclusive)}")
    target = {}  # field -> the parser or mutually exclusive group its flag goes to
    for group in exclusive:
        box = parser.add_mutually_exclusive_group(required=bool(set(group) & set(required)))
        target.update({name: box for name in group})
    comments = field_help(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = _optional_inner(hints[f.name])
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        text = helps_over.get(f.name, comments.get(f.name, ""))
        shown = f.name not in required and f.name not in positional and f.name not in false_flags
        hidden = default is None or default is False or default in ("", ())  # --x: off by default
        if shown and not hidden:
            text += f" (default: {_show(default)})"
        kw: dict[str, Any] = {"help": text.strip().replace("%", "%%") or None}
        if f.name in false_flags:
            if tp is not bool:
                raise ValueError(f"false_flags: {f.name} is not a bool field")
            target.get(f.name, parser).add_argument(false_flags[f.name], dest=f.name, action="store_false",
                                                    default=argparse.SUPPRESS, help=kw["help"])
            continue
        if tp is bool:
            kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        else:
            origin, args = typing.get_origin(tp), typing.get_args(tp)
            elem = tp
            if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
                elem = args[0]
                if f.name in positional:
                    kw["nargs"] = "+"
                else:
                    kw["action"] = "append"
            elif origin is tuple:
                elem = args[0]
                kw["nargs"] = len(args)
            if typing.get_origin(elem) is typing.Literal:
                kw["choices"] = typing.get_args(elem)
                elem = type(kw["choices"][0])
            kw["type"] = types.get(f.name, elem if elem in (int, float, str) else str)
            if f.name in choices:
                kw["choices"] = choices[f.name]
            if f.name in metavars:
                kw["metavar"] = metavars[f.name]
        if f.name in positional:
            parser.add_argument(f.name, **kw)
            continue
        if f.name in required and f.name not in target:
            kw["required"] = True
        target.get(f.name, parser).add_argument(flags.get(f.name, flag_name(f.name)), dest=f.name,
                                                default=argparse.SUPPRESS, **kw)
    return parser


def _optional_inner(tp):
    """`T | None` (Optional[T]) -> T; any other type unchanged."""
    import types as pytypes

    if typing.get_origin(tp) in (typing.Union, pytypes.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def given(cls, args) -> dict:
    """The fields of `cls` present in the argparse namespace `args` (lists become tuples)."""
    ns = vars(args)
    return {f.name: tuple(ns[f.name]) if isinstance(ns[f.name], list) else ns[f.name]
            for f in dataclasses.fields(cls) if f.name in ns}


def from_args(cls: type[T], args, base: T | None = None, sets=()) -> T:
    """`base` (a preset; default `cls()`) with the options present in `args` applied, then the
    `--set KEY=VALUE` items `sets` (see `parse_sets`), validated by the dataclass. With
    `add_arguments`' flags only the options the user typed are present, so a preset's other
    values stay. A ValueError names unknown or invalid values."""
    changes = given(cls, args)
    extra = parse_sets(cls, sets)
    if base is not None and not isinstance(base, cls):
        raise TypeError(f"from_args: base is a {type(base).__name__}, not a {cls.__name__}")
    for key, value in extra.items():
        if isinstance(value, dict):  # a nested dataclass: its fields change, the others stay
            inner = changes.get(key, getattr(base, key) if base is not None else None)
            if inner is None:
                inner = typing.get_type_hints(cls)[key]()
            value = dataclasses.replace(inner, **value)
        changes[key] = value
    if base is None:
        return from_dict(cls, changes)
    return dataclasses.replace(base, **changes)


# --- --set KEY=VALUE: any field by its name, the same in every stage ------------------------

def add_set_argument(parser, what: str):
    """Add `--set KEY=VALUE` (repeatable) to an argparse parser; `what` names the config class
    in the help. `from_args(..., sets=args.set)` applies the items after the other options."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"any {what} field by its name, e.g. --set seed=3 (repeatable; applied "
                        "after the options above; a nested field as part.field=VALUE, a tuple "
                        "as comma-separated values)")
    return parser


def parse_sets(cls, items) -> dict:
    """`["key=value", "part.field=value", ...]` -> `{key: value, part: {field: value}}`, each
    value read as its field's type (bools as 1/0, true/false, yes/no; tuples comma-separated;
    "none" for a `T | None` field). A ValueError names a malformed item or an unknown key."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    out: dict = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        head, dot, rest = key.partition(".")
        if head not in known:
            raise ValueError(f"--set: {cls.__name__}: unknown keys {[head]}; known: {sorted(known)}")
        tp = hints[head]
        if dot:
            inner = _optional_inner(tp)
            if not dataclasses.is_dataclass(inner):
                raise ValueError(f"--set {item!r}: {head} has no fields")
            out.setdefault(head, {}).update(parse_sets(inner, [f"{rest}={text}"]))
            continue
        out[head] = _from_text(tp, text, item)
    return out


def _from_text(tp, text: str, item: str):
    inner = _optional_inner(tp)
    if inner is not tp and text.lower() == "none":
        return None
    if typing.get_origin(inner) is tuple and not dataclasses.is_dataclass(inner):
        text = [t.strip() for t in text.split(",") if t.strip()] if text else []
    try:
        return _coerce(tp, text)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--set {item!r}: {err}") from None


def preset(presets: Mapping[str, T], name: str) -> T:
    """`presets[name]`, or a ValueError listing the known names."""
    try:
        return presets[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(presets)}") from None
