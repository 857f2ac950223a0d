"""Which texts are instructions of which world: a domain's grammar lives with its environment, so the
model can check its inputs (``model/inputs.py``) without importing the domain table above it."""

from __future__ import annotations

import functools
from typing import Any, Callable

from selfimprove.envs.tabletop.tasks import parse_instruction
from selfimprove.errors import ConfigError

#: instruction -> task per domain; raises ConfigError naming what is wrong. Other domains (the point
#: mass, tasks of your own) take any non-empty text.
INSTRUCTION_PARSERS: dict[str, Callable[[str], Any]] = {"language-table": parse_instruction}


@functools.lru_cache(maxsize=65_536)
def instruction_problem(domain: str, text: str) -> str | None:
    """Why ``text`` is not an instruction of ``domain``, or None when it is (each text is parsed once).

    An empty instruction never is; the language-table domain's must parse (``envs.tabletop.tasks.parse_instruction``).
    """
    if not isinstance(text, str):
        return f"it is {type(text).__name__}, not text; every episode and every observation needs an instruction"
    if not text.strip():
        return "it is empty; every episode and every observation needs an instruction"
    parser = INSTRUCTION_PARSERS.get(domain)
    if parser is None:
        return None
    try:
        parser(text)
    except ConfigError as exc:
        return str(exc)
    return None
