"""The config reference (docs/config.md), generated from the dataclasses in ``config.py``.

The reference is built from the code itself (field names, types, defaults, the inline comments, each
section's docstring, the presets in ``configs/`` and the CLI's flag-to-field map), so it cannot drift
from what the loader accepts. A test checks that the committed page equals this output; regenerate
with ``python -m selfimprove.config_reference > docs/config.md``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import tomllib
import typing
from typing import Any, Iterable

from selfimprove import config as config_module
from selfimprove.config import RunConfig

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^=#]*(?:=[^#]*)?(?:#\s*(?P<comment>.*))?$")

_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


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


def _code_pattern(names: Iterable[str] = ()) -> re.Pattern:
    """Spans of comment text shown as code: quoted values, ``{...}``, flags, ``section.field``, paths, files.

    Also the section's own field ``names`` that hold an underscore (``eval_every``; not plain words).
    """
    sections = "|".join(name for name, _ in _sections() if name)
    own = "|".join(sorted((n for n in names if "_" in n), key=len, reverse=True)) or "(?!)"
    return re.compile(r'"[^"]*"|\{[^}]*\}|(?<![\w-])--[a-z][a-z-]*'
                      rf"|(?<![\w.])(?:{sections})\.[a-z_]+(?:=[\w.]+)?"
                      rf"|(?<![\w.])(?:{own})(?![\w.])"
                      r"|[\w.<>*-]*[\w<>*-]/[\w.<>*/-]*[\w>*/]"
                      r"|(?<![\w.])[\w-]+\.(?:jsonl|json|md|py|toml|png|gif)\b")


def _code_span(match: re.Match) -> str:
    text = match.group(0)
    if text.startswith("docs/") and text.endswith(".md"):  # this page lives in docs/: link the sibling page
        return f"[{text}]({text.removeprefix('docs/')})"
    return f"`{text}`"


def _inline(text: str, names: Iterable[str] = ()) -> str:
    """Comment or docstring text as Markdown: RST ``code`` to `code`, code-like spans marked, tags escaped.

    ``names``: field names of the section the text belongs to (those with an underscore become code).
    """
    parts = re.split(r"(``.*?``|`[^`]*`)", text)
    code = _code_pattern(names)
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # already code
            out.append("`" + part.strip("`") + "`")
            continue
        pieces = []
        last = 0
        for match in code.finditer(part):
            pieces.append(_TAG_START.sub("&lt;", part[last:match.start()]))
            pieces.append(_code_span(match))
            last = match.end()
        pieces.append(_TAG_START.sub("&lt;", part[last:]))
        out.append("".join(pieces))
    return "".join(out)


def _cell(text: str) -> str:
    """Text for a table cell: pipes escaped (GitHub tables split on them, even inside code spans)."""
    return text.replace("|", "\\|")


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
    """A default as it is written in a preset (``none`` for None, which TOML spells as the string "none")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value).replace("'", '"')


def _flags() -> dict[str, str]:
    """Config field -> the command-line flag that sets it (``selfimprove.cli.FLAG_FIELDS``)."""
    from selfimprove.cli import FLAG_FIELDS

    return {field: "--" + flag.replace("_", "-") for flag, field in FLAG_FIELDS.items()}


def config_fields() -> list[tuple[str, str]]:
    """``(dotted name, section)`` of every leaf field of :class:`RunConfig` ("" for the top level)."""
    out = []
    for section, cls in _sections():
        hints = typing.get_type_hints(cls)
        out += [(f"{section}.{f.name}" if section else f.name, section) for f in dataclasses.fields(cls)
                if not dataclasses.is_dataclass(hints[f.name])]
    return out


def _sections() -> list[tuple[str, type]]:
    hints = typing.get_type_hints(RunConfig)
    return [("", RunConfig)] + [(f.name, hints[f.name]) for f in dataclasses.fields(RunConfig)
                                if dataclasses.is_dataclass(hints[f.name])]


def _rows(cls: type, prefix: str, flags: dict[str, str]) -> list[str]:
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        name = f"{prefix}{f.name}"
        text = _inline(comments.get(f.name, ""), [g.name for g in dataclasses.fields(cls)])
        if name in flags:
            text += ("" if text.endswith(".") else ".") + f" Flag: `{flags[name]}`."
        rows.append(f"| `{name}` | `{_cell(_type_name(hints[f.name]))}` | `{_format(_default(f))}` | {_cell(text)} |")
    return rows


def _preset_rows() -> list[str]:
    rows = []
    for name in config_module.available_presets():
        path = config_module.PRESET_DIR / f"{name}.toml"
        with path.open("rb") as fh:
            extends = tomllib.load(fh).get("extends")
        config = config_module.load_config(name)
        rows.append(f"| `{name}` | {f'`{extends}`' if extends else ''} | `{config.domain}` | `{config.env.id}` | "
                    f"`{config.model.encoder}` |")
    return rows


_INTRO = """\
# Config reference

Generated from `src/selfimprove/config.py` by `python -m selfimprove.config_reference > docs/config.md`;
do not edit by hand (a test checks that this page matches the code).

A run is configured by one `RunConfig`: a few top-level fields and one section per stage or part,
each a dataclass in `config.py`. Every run saves its whole config as `runs/<name>/config.json`.

## Setting a field

A field takes its value from, in increasing order of precedence: the default below, the preset, a
`--set` override, and a dedicated flag where the field has one (named in the tables). A preset is a
TOML file: a name in `configs/` (table below) or a path to any `.toml` file. Top-level fields come
first, each section is a TOML table, and `extends` names a preset (or `.toml` path) whose values the
file starts from. TOML has no null, so an optional field is reset with the string `"none"`. For
example, a file `pm-small.toml`:

```toml
extends = "pointmass"        # start from configs/pointmass.toml
name = "pm-small"
seed = 1

[model]
hidden = 128

[improve]
lr = 1e-4
success_threshold = "none"   # calibrate s on held-out demos (the default)
```

On the command line every command that takes a preset also takes `--set section.field=value`
(repeatable; a top-level field has no section; lists and tables are written as JSON), and
`--quick` picks the preset `<preset>-quick`:

```bash
selfimprove run pm-small.toml --set improve.lr=3e-4 --set seed=2
selfimprove run pointmass --quick --set improve.success_threshold=2.5 --robots 8
selfimprove run language-table --set sft.augment='["mirror"]' --set env.kwargs='{"image_size": 32}'
```

From Python: `selfimprove.load_config("pointmass", ["improve.lr=1e-4", "seed=1"])`. Unknown keys,
wrong types and out-of-range values stop with an error that names the field and suggests the closest
known key. `selfimprove experiment` takes `--set` too and applies it to every cell of the grid
([experiments.md](experiments.md)).

## Presets

| preset | extends | `domain` | `env.id` | `model.encoder` |
|---|---|---|---|---|
"""


def config_reference_markdown() -> str:
    """The whole reference page as Markdown."""
    lines = _INTRO.splitlines() + _preset_rows()
    lines += ["", "Each preset is `configs/<preset>.toml`; the comments in those files say what each one is for.", ""]
    flags = _flags()
    for name, cls in _sections():
        if name:
            title, where = f"`[{name}]`", (f"TOML table `[{name}]`; on the command line "
                                           f"`--set {name}.<field>=<value>`.")
        else:
            title, where = "Top level", ("Top-level keys of a preset (before its first table); on the command "
                                         "line `--set <field>=<value>`.")
        lines += [f"## {title}", "", _inline(inspect.cleandoc(cls.__doc__ or "")), "", where, "",
                  "| field | type | default | meaning |", "|---|---|---|---|"]
        lines += _rows(cls, f"{name}." if name else "", flags)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
