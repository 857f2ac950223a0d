"""Whether a text is an instruction of a domain: its grammar (``Domain.instruction_parser`` in the domain
table, which lives with its environment), so the model can check its inputs (``model/inputs.py``)."""

from __future__ import annotations

import functools

from selfimprove.domain_table import DOMAINS, resolve
from selfimprove.errors import ConfigError


@functools.lru_cache(maxsize=65_536)
def instruction_problem(domain: str, text: str) -> str | None:
    """Why ``text`` is not an instruction of ``domain``, or None when it is (each text is parsed once).

    An empty instruction never is; a domain with a grammar (the language-table's) must parse it; other
    domains (the point mass, tasks of your own) take any non-empty text.
    """
    if not isinstance(text, str):
        return f"it is {type(text).__name__}, not text; every episode and every observation needs an instruction"
    if not text.strip():
        return "it is empty; every episode and every observation needs an instruction"
    entry = DOMAINS.get(domain)
    if entry is None or not entry.instruction_parser:
        return None
    try:
        resolve(entry.instruction_parser)(text)
    except ConfigError as exc:
        return str(exc)
    return None
