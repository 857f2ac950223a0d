"""The config reference (docs/config.md), generated from the dataclasses in ``config.py``.

The reference is built from the code itself (field names, types, defaults, the inline comments and each
section's docstring), so it cannot drift from what the loader accepts. A test checks that the committed
page equals this output; regenerate with ``python -m selfimprove.config_reference > docs/config.md``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

from selfimprove import config as config_module
from selfimprove.config import RunConfig

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^=#]*(?:=[^#]*)?(?:#\s*(?P<comment>.*))?$")


def _field_comments(cls: type) -> dict[str, str]:
    """Inline ``# ...`` comments of a dataclass's field lines (and their continuation lines)."""
    comments: dict[str, str] = {}
    last: str | None = None
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        match = _FIELD_LINE.match(line)
        if match and not stripped.startswith(("#", "def ", "@", "return", '"""')):
            last = match.group(1)
            if match.group("comment"):
                comments[last] = match.group("comment").strip()
        elif stripped.startswith("#") and last is not None and last in comments:
            comments[last] += " " + stripped.lstrip("# ").strip()
        elif stripped.startswith(("def ", "@")):
            break
    return comments


def _type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return text.replace("typing.", "")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value).replace("'", '"')


def _rows(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        text = comments.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | `{_type_name(hints[f.name])}` | `{_format(_default(f))}` | {text} |")
    return rows


def config_reference_markdown() -> str:
    """The whole reference page as Markdown."""
    lines = [
        "# Config reference",
        "",
        "Generated from `src/selfimprove/config.py` by `python -m selfimprove.config_reference`; do not edit",
        "by hand. Every field can be set in a preset TOML (`[section]` tables), or on the command line with",
        "`--set section.field=value`. Unknown keys and wrong types are rejected with a suggestion.",
        "",
        "Presets: " + ", ".join(f"`{p}`" for p in config_module.available_presets()) + " (in `configs/`).",
        "",
    ]
    hints = typing.get_type_hints(RunConfig)
    sections = [("", RunConfig)] + [
        (f.name, hints[f.name]) for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])
    ]
    for name, cls in sections:
        title = "Top level" if not name else f"`[{name}]`"
        lines += [f"## {title}", "", inspect.cleandoc(cls.__doc__ or ""), "",
                  "| field | type | default | meaning |", "|---|---|---|---|"]
        lines += _rows(cls, f"{name}." if name else "")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
