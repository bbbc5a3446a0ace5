"""MkDocs hook: the reference pages that are generated from the code at build time, so they cannot drift.

A page asks for generated text with a marker comment on a line of its own:

    <!-- mlfarm:settings -->                 every field of mlfarm.settings.Settings, as a table
    <!-- mlfarm:settings prefix=gateway_ --> only those named MLFARM_GATEWAY_*
    <!-- mlfarm:settings model=sam2 -->      a built-in model plugin's own settings group (its settings_class)
    <!-- mlfarm:cli -->                      every command of the `mlfarm` click group, with its --help

Only ``mlfarm.settings.Settings`` and ``mlfarm.cli.main`` are imported, and nothing else about their
layout is assumed: ``mlfarm.cli`` may be a module or a package, a command may be a group, and a
setting may be a nested group of settings (rendered as ``MLFARM_GROUP__FIELD``, pydantic-settings'
nested form). If either cannot be imported the build fails, saying why: a reference page that
quietly lost its table would be worse than no page.
"""

from __future__ import annotations

import enum
import re
import shlex
from pathlib import Path, PurePath
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

MARKER = re.compile(r"^<!--\s*mlfarm:(?P<what>settings|cli)(?P<args>[^>]*?)\s*-->[ \t]*$", re.MULTILINE)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def replace(match: re.Match[str]) -> str:
        args = dict(word.split("=", 1) for word in shlex.split(match["args"]) if "=" in word)
        if match["what"] == "settings":
            return settings_table(prefix=args.get("prefix", ""), model=args.get("model", ""))
        return cli_reference()

    return MARKER.sub(replace, markdown)


# --- settings ------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    """Table-safe: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _home(text: str) -> str:
    """Defaults under the builder's home directory are shown as ``~/...``, as they are for everyone."""
    home = str(Path.home())
    return text.replace(home, "~") if home not in ("", "/") else text


def _type_name(annotation: Any) -> str:
    """A reader's name for a field's type: text, integer, a list of choices, ``A or B``."""
    if annotation is None or annotation is type(None):
        return "none"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return ", ".join(f"`{a}`" for a in args)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, UnionType):
        kept = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(kept) + (", optional" if type(None) in args else "")
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return ", ".join(f"`{m.value}`" for m in annotation)
        if issubclass(annotation, PurePath):
            return "path"
        return {"str": "text", "int": "integer", "float": "number", "bool": "true/false"}.get(
            annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _default(field: Any) -> str:
    try:
        from pydantic_core import PydanticUndefined
    except ImportError:  # pragma: no cover - pydantic 2 always has it
        PydanticUndefined = object()  # noqa: N806
    if getattr(field, "default_factory", None) is not None:
        try:
            value = field.default_factory()
        except TypeError:  # a factory that wants the validated data
            return "(computed)"
    else:
        value = field.default
    if value is PydanticUndefined:
        return "(required)"
    if value is None:
        return "unset"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return "empty"
    return f"`{_home(str(value))}`"


def _is_settings_group(annotation: Any) -> bool:
    try:
        from pydantic import BaseModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _rows(model: type, env_prefix: str, delimiter: str, name_prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
        env = (alias or f"{env_prefix}{name}").upper()
        if _is_settings_group(field.annotation):
            rows += _rows(field.annotation, f"{env}{delimiter}", delimiter, f"{name_prefix}{name}.")
            continue
        rows.append((f"{name_prefix}{name}", env, _type_name(field.annotation), _default(field),
                     _home(field.description or "")))
    return rows


def settings_table(prefix: str = "", model: str = "") -> str:
    from mlfarm.settings import Settings

    if model:  # a plugin's own group: the catalog's built-in model of that name declares it
        from mlfarm.models.catalog import Catalog, discover

        Settings = Catalog(discover([])).entry(model).cls.settings_class  # noqa: N806
        if Settings is None:
            raise ValueError(f"docs: model {model} declares no settings_class; fix the page's mlfarm:settings marker")
    config = getattr(Settings, "model_config", {}) or {}
    env_prefix = config.get("env_prefix", "MLFARM_")
    delimiter = config.get("env_nested_delimiter") or "__"
    rows = [r for r in _rows(Settings, env_prefix, delimiter) if r[1].startswith((env_prefix + prefix).upper())]
    if not rows:
        raise ValueError(f"docs: no setting of mlfarm.settings.Settings is named {(env_prefix + prefix).upper()}*; "
                         "fix the page's mlfarm:settings marker")
    lines = ["| variable | type | default | meaning |", "| --- | --- | --- | --- |"]
    for _name, env, type_name, default, description in rows:
        lines.append(f"| `{env}` | {_cell(type_name)} | {_cell(default)} | {_cell(description) or '—'} |")
    return "\n".join(lines)


# --- CLI -----------------------------------------------------------------------------------------
def _walk(command: Any, path: list[str], parent: Any):
    import click

    ctx = click.Context(command, info_name=path[-1], parent=parent, terminal_width=100,
                        max_content_width=100)
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not getattr(sub, "hidden", False):
                yield from _walk(sub, [*path, name], ctx)


def cli_reference() -> str:
    from mlfarm.cli import main

    out = []
    for path, command, ctx in _walk(main, ["mlfarm"], None):
        level = "##" if len(path) <= 2 else "###"
        title = " ".join(path)
        out.append(f"{level} `{title}`\n")
        # The exact text `--help` prints: usage, help, every option with its default.
        out.append("```text\n" + command.get_help(ctx).rstrip() + "\n```\n")
    return "\n".join(out)
