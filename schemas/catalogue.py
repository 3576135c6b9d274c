"""Markdown tables of models, for the generated parts of ``docs/protocol.md``.

Pure text from pydantic models: field names, types named as :mod:`schemas.fields` names
them, defaults and the documentation written beside each field. What a document holds
and which models it lists is decided by its generator (``fleet.protocol_doc``), which
may import every package; this module imports only schemas and pydantic.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import re
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from schemas import auth, events, fields, jobs, presence, update

_ALIAS_MODULES = (fields, events, jobs, presence, auth, update)


def _named_aliases() -> list[tuple[str, Any, str]]:
    """``(name, alias, doc)`` for every public type alias of the schema modules.

    A name two modules define differently is qualified by the later module's name.
    """
    found: list[tuple[str, Any, str]] = []
    for module in _ALIAS_MODULES:
        docs = _module_attribute_docs(module)
        for name, value in vars(module).items():
            if name.startswith("_") or not name[:1].isupper() or isinstance(value, type):
                continue
            if get_origin(value) is None or any(value is a for _, a, _ in found):
                continue
            if name == "AnyEventData":
                continue  # the union of every event: the catalogue itself
            shown = name
            if any(n == name for n, _, _ in found):
                shown = f"{module.__name__.rsplit('.', 1)[-1]}.{name}"
            found.append((shown, value, docs.get(name, "")))
    return found


def _docs_after_assignments(body: list[ast.stmt]) -> dict[str, str]:
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        target = None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            target = node.target.id
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            target = node.targets[0].id
        if (
            target is not None
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[target] = inspect.cleandoc(after.value.value)
    return docs


def _module_attribute_docs(module: types.ModuleType) -> dict[str, str]:
    try:
        return _docs_after_assignments(ast.parse(inspect.getsource(module)).body)
    except (OSError, TypeError):
        return {}


_ALIASES = _named_aliases()


_LIMITS = (
    ("ge", "≥ {}"),
    ("gt", "> {}"),
    ("le", "≤ {}"),
    ("lt", "< {}"),
    ("min_length", "len ≥ {}"),
    ("max_length", "len ≤ {}"),
    ("pattern", "`{}`"),
)


def _flatten(metadata: Iterable[Any]) -> list[Any]:
    items: list[Any] = []
    for item in metadata:
        items += _flatten(item.metadata) if isinstance(item, FieldInfo) else [item]
    return items


def _constraints(metadata: Iterable[Any]) -> list[str]:
    """The limits in ``metadata``, always in the order of :data:`_LIMITS`.

    pydantic keeps each limit as an ``annotated_types`` object with one attribute; the
    fixed order keeps the generated text the same whatever order pydantic lists them in.
    """
    items = _flatten(metadata)
    out: list[str] = []
    for attr, template in _LIMITS:
        for item in items:
            value = getattr(item, attr, None)
            if value is not None and not callable(value):
                out.append(template.format(value).replace("|", "\\|"))
    return out


def type_name(tp: Any) -> str:
    """A short, readable name of an annotation (``AgentId``, ``list[Token]``, …)."""
    for name, alias, _ in _ALIASES:
        if tp is alias or (get_origin(tp) is get_origin(alias) and tp == alias):
            return name
    origin = get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = get_args(tp)
        limits = _constraints(meta)
        return type_name(base) + (f" ({', '.join(limits)})" if limits else "")
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(arg) for arg in get_args(tp))
    if origin is Literal:
        return " \\| ".join(json.dumps(arg) for arg in get_args(tp))
    if origin is not None:
        args = ", ".join(type_name(arg) for arg in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def attribute_docs(klass: type) -> dict[str, str]:
    """The docstrings written under attributes (``x: int`` then a string), by name.

    Inherited attributes included; classes outside this project's source are skipped.
    """
    docs: dict[str, str] = {}
    for cls in reversed(klass.__mro__):
        if cls is object or cls is BaseModel or cls.__module__.startswith("pydantic"):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        docs.update(_docs_after_assignments(body.body))
    return docs


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().replace("|", "\\|")


def summary(obj: Any) -> str:
    """The first paragraph of an object's docstring, on one line."""
    doc = inspect.getdoc(obj) or ""
    return _one_line(doc.split("\n\n", 1)[0])


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        try:
            value = info.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "computed"
        if isinstance(value, dict | list) and not value:
            return f"`{json.dumps(value)}`"
        return "computed"
    if info.is_required():
        return "required"
    return f"`{_literal(info.default)}`"


def _literal(value: Any) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value)


def fields_table(model: type[BaseModel], *, key_header: str = "field") -> str:
    """A markdown table of the model's fields: name, type, default, meaning."""
    hints = typing.get_type_hints(model, include_extras=True)
    docs = attribute_docs(model)
    rows = [f"| {key_header} | type | default | meaning |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        key = info.alias or name
        meaning = info.description or docs.get(name, "")
        hint = hints.get(name, info.annotation)
        shown = type_name(hint)
        if get_origin(hint) is not typing.Annotated and info.metadata:
            limits = _constraints(info.metadata)  # limits given with Field(...)
            shown += f" ({', '.join(limits)})" if limits else ""
        rows.append(f"| `{key}` | {shown} | {_default(info)} | {_one_line(meaning)} |")
    return "\n".join(rows)


def alias_table() -> str:
    """The named field types the tables use, with what each accepts."""
    rows = ["| type | is | meaning |", "|---|---|---|"]
    for name, alias, doc in _ALIASES:
        origin = get_origin(alias)
        if origin is typing.Annotated:
            base, *meta = get_args(alias)
            limits = _constraints(meta)
            shown = type_name(base) + (f" ({', '.join(limits)})" if limits else "")
        else:
            # Render the definition, not the alias's own name.
            args = get_args(alias)
            joiner = " \\| "
            if origin is Literal:
                shown = joiner.join(json.dumps(a) for a in args)
            elif origin in (typing.Union, types.UnionType):
                shown = joiner.join(type_name(a) for a in args)
            else:
                inner = ", ".join(type_name(a) for a in args)
                shown = f"{getattr(origin, '__name__', str(origin))}[{inner}]"
        rows.append(f"| {name} | {shown} | {_one_line(doc)} |")
    return "\n".join(rows)


def model_section(model: type[BaseModel], heading: str, *, level: int = 3) -> str:
    """A heading, the model's summary and its fields table."""
    parts = [f"{'#' * level} {heading}", ""]
    text = summary(model)
    if text:
        parts += [text, ""]
    if model.model_fields:
        parts.append(fields_table(model))
    else:
        parts.append("No fields.")
    return "\n".join(parts)


def event_catalogue(
    models: Iterable[type[events.EventData]], subjects: Mapping[str, str] | None = None
) -> str:
    """One section per event type: version, subject, summary and fields."""
    parts: list[str] = []
    index = ["| type | v | subject |", "|---|---|---|"]
    for model in models:
        subject = (subjects or {}).get(model.TYPE, "")
        anchor = _anchor(f"{model.TYPE} v{model.VERSION}")
        index.append(f"| [`{model.TYPE}`](#{anchor}) | {model.VERSION} | `{subject}` |")
        parts.append(model_section(model, f"`{model.TYPE}` v{model.VERSION}", level=4))
    return "\n".join(index) + "\n\n" + "\n\n".join(parts)


def _anchor(heading: str) -> str:
    # GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped.
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


GENERATED = re.compile(
    r"(<!-- generated:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)",
    re.S,
)


def replace_sections(text: str, sections: Mapping[str, str]) -> str:
    """``text`` with each ``<!-- generated:NAME -->`` … ``<!-- /generated:NAME -->`` body
    replaced by ``sections[NAME]``.

    Raises:
        ValueError: a section has no markers in ``text``, or markers name no section.
    """
    seen: set[str] = set()

    def body(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in sections:
            raise ValueError(f"generated section {name!r} is not known to the generator")
        seen.add(name)
        return f"{match[1]}{sections[name].strip()}\n{match[4]}"

    result = GENERATED.sub(body, text)
    missing = sorted(set(sections) - seen)
    if missing:
        raise ValueError(
            "no markers for generated section(s) "
            + ", ".join(f"<!-- generated:{m} --> … <!-- /generated:{m} -->" for m in missing)
        )
    return result
