"""What an instruction must be, for the model and for the env that scores it.

The model reads any non-empty text (:func:`instruction_problem`): a paraphrase, a typo, an instruction
from a real robot's dataset. A domain's task grammar (``Domain.instruction_parser`` in the domain table,
which lives with its environment) says which texts its simulator can *score* (:func:`task_problem`); only
code that must score a task parses it, and a store of instructions outside the grammar trains with a
warning (``domains.check_store``).
"""

from __future__ import annotations

import functools

from selfimprove.domain_table import DOMAINS, resolve
from selfimprove.errors import ConfigError


def instruction_problem(domain: str, text: object) -> str | None:
    """Why ``text`` cannot be an instruction at all (not text, or empty), or None when it can.

    ``domain`` is accepted for the callers that name it; no domain narrows what a model reads.
    """
    if not isinstance(text, str):
        return f"it is {type(text).__name__}, not text; every episode and every observation needs an instruction"
    if not text.strip():
        return "it is empty; every episode and every observation needs an instruction"
    return None


@functools.lru_cache(maxsize=65_536)
def task_problem(domain: str, text: str) -> str | None:
    """Why the simulator of ``domain`` cannot score ``text`` (its task grammar does not parse it), or None.

    Domains without a grammar (the point mass, tasks of your own) score any non-empty text.
    """
    problem = instruction_problem(domain, text)
    entry = DOMAINS.get(domain)
    if problem is not None or entry is None or not entry.instruction_parser:
        return problem
    try:
        resolve(entry.instruction_parser)(text)
    except ConfigError as exc:
        return str(exc)
    return None
