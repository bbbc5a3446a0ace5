"""What a job needs of the worker that renders it, and the queue that carries it there.

A requirement item is either a plain tag (``80gb``, ``h200``, ``cpu``), which a worker has when it
was given it (``mlfarm worker --tags``, ``MLFARM_WORKER_TAGS``) or derived it from its GPU, or a
numeric comparison on a worker fact (``gpu_memory_gb>=24``). A job's requirement is the items of
``mlfarm submit --require`` plus those its model declares (``BaseModel.requires``).

Chunks reach only workers that satisfy the requirement by Celery routing, not by workers turning
them away: a job with a requirement goes to the queue ``<queue>@<item>+<item>`` (``gpu@80gb+h200``),
registered at submission in ``mlfarm:queues:require``; every worker consumes its plain queues and
each requirement queue it satisfies, and picks up new ones on its heartbeat (worker/nodes.py).

Python 3.7 grammar: Nuke's Python imports the client that uses it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Mapping
from typing import Any

from mlfarm.keys import REQUIREMENT_QUEUES

#: Separates a queue from its requirement, and the requirement's items, in a queue's name.
QUEUE_SEP = "@"
ITEM_SEP = "+"

_TAG = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_COMPARISON = re.compile(r"^([a-z_][a-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(-?[0-9]+(?:\.[0-9]+)?)$")
_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt,
        "<": operator.lt}


class RequirementError(ValueError):
    """A requirement item that is neither a tag nor a comparison on a fact."""


def canonical(item: str) -> str:
    """One requirement item in its one spelling: lower case, no spaces (``GPU_memory_gb >= 24`` ->
    ``gpu_memory_gb>=24``); RequirementError says what is wrong with one that is neither form."""
    text = str(item).strip().lower()
    m = _COMPARISON.match(text)
    if m:
        number = m.group(3)
        if "." in number:
            number = number.rstrip("0").rstrip(".")
        return f"{m.group(1)}{m.group(2)}{number}"
    if _TAG.match(text):
        return text
    raise RequirementError(
        f"requirement {item!r} is neither a tag (letters, digits, '_', '.', '-': e.g. 80gb, h200) nor a "
        "comparison on a worker fact (e.g. gpu_memory_gb>=24)")


def normalise(items: Iterable[str] | str | None) -> list[str]:
    """Requirement items (a list, or one comma-separated string) sorted, unique, canonical."""
    if items is None:
        return []
    if isinstance(items, str):
        items = items.split(",")
    return sorted({canonical(i) for i in items if str(i).strip()})


def holds(item: str, tags: Iterable[str], facts: Mapping[str, Any]) -> bool:
    """Whether a worker with ``tags`` and ``facts`` meets one requirement item."""
    m = _COMPARISON.match(item)
    if m is None:
        return item in {str(t).lower() for t in tags}
    value = facts.get(m.group(1))
    if value is None:
        return False
    try:
        return bool(_OPS[m.group(2)](float(value), float(m.group(3))))
    except (TypeError, ValueError):
        return False


def missing(requirement: Iterable[str], tags: Iterable[str], facts: Mapping[str, Any]) -> list[str]:
    """The items of ``requirement`` a worker with ``tags`` and ``facts`` does not meet."""
    tags = list(tags)
    return [i for i in requirement if not holds(i, tags, facts)]


def satisfied(requirement: Iterable[str], tags: Iterable[str], facts: Mapping[str, Any]) -> bool:
    return not missing(requirement, tags, facts)


def queue_for(queue: str, requirement: Iterable[str] | None) -> str:
    """The queue a job's chunks go to: its plain queue, or that queue's requirement queue."""
    items = normalise(requirement)
    return queue + QUEUE_SEP + ITEM_SEP.join(items) if items else queue


def split_queue(name: str) -> tuple[str, list[str]]:
    """A queue's name as (plain queue, requirement items)."""
    base, sep, rest = name.partition(QUEUE_SEP)
    return base, (rest.split(ITEM_SEP) if sep and rest else [])


def register_queue(client: Any, name: str) -> None:
    """Make a requirement queue known to every worker (a plain queue needs nothing)."""
    if QUEUE_SEP in name:
        client.sadd(REQUIREMENT_QUEUES, name)


def requirement_queues(client: Any) -> list[str]:
    """Every requirement queue submitted to, in a stable order."""
    return sorted(client.smembers(REQUIREMENT_QUEUES))


def describe(requirement: Iterable[str]) -> str:
    """``tags 80gb, h200 and gpu_memory_gb>=24`` for status lines."""
    items = list(requirement)
    tags = [i for i in items if not _COMPARISON.match(i)]
    facts = [i for i in items if _COMPARISON.match(i)]
    parts = []
    if tags:
        parts.append(f"tag{'s' if len(tags) > 1 else ''} {', '.join(tags)}")
    if facts:
        parts.append(", ".join(facts))
    return " and ".join(parts)
