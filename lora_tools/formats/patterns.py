"""rank_pattern / alpha_pattern keys, matched as PEFT matches them, in bounded time.

PEFT (`peft.utils.other.get_pattern_key`) gives a module the value of the first key k
with re.match(rf"(.*\\.)?({k})$", module path). The keys come from strangers' configs, and
a backtracking regex such as `(a+)+$` or `(.*)*(.*)*z` takes minutes against one module
path. So keys are judged before any is run:

- a plain key (letters, digits, `_`, `.`) is tried as an exact or dotted-suffix match
  first (what it almost always is), then as the regex PEFT runs, which without a
  quantifier costs O(len(path)·len(key));
- any other key must be at most `MAX_KEY_CHARS` long, hold no backreference, no
  quantifier or alternation under a quantifier (the exponential cases), and at most
  `MAX_OPEN_REPEATS` variable-length quantifiers (each multiplies the work by the path's
  length); it is only matched against paths of at most `MAX_PATH_CHARS`;
- all regex work for one table is timed; past `TIME_BUDGET_S` the key being matched is
  refused (a backstop the rules above keep out of reach of real configs).

A key that breaks a rule is an error naming the key (`UnsafePattern`); a key that is no
valid regex is skipped, as it always was (PEFT itself would raise on it).
"""

from __future__ import annotations

import importlib
import re
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_KEY_CHARS", "MAX_PATH_CHARS", "PatternTable", "UnsafePattern", "pattern_problem"]

MAX_KEY_CHARS = 256
MAX_PATH_CHARS = 256
MAX_OPEN_REPEATS = 3
TIME_BUDGET_S = 2.0
_PLAIN = re.compile(r"^[\w.]+$")

_parser: Any = importlib.import_module("re._parser")  # the stdlib's own parse tree (sre_parse before 3.11)
_REPEATS = {_parser.MAX_REPEAT, _parser.MIN_REPEAT, getattr(_parser, "POSSESSIVE_REPEAT", _parser.MAX_REPEAT)}
_BACKREFS = {_parser.GROUPREF, _parser.GROUPREF_EXISTS}


class UnsafePattern(Exception):
    """A pattern key whose matching could take unbounded time; str() says why, naming the key."""


class _Refused(Exception):
    pass


def _open_repeats(items: Any, under_repeat: bool) -> int:
    """The number of variable-length quantifiers in a parsed regex; _Refused on the
    constructs whose backtracking is exponential."""
    count = 0
    for op, av in items:
        if op in _BACKREFS:
            raise _Refused("a backreference")
        if op in _REPEATS:
            low, high, body = av
            if high > 1:
                if under_repeat:
                    raise _Refused("nested quantifiers")
                count += int(high != low)
                count += _open_repeats(body, True)
            else:
                count += _open_repeats(body, under_repeat)
        elif op == _parser.BRANCH:
            if under_repeat:
                raise _Refused("alternation under a quantifier")
            count += sum(_open_repeats(branch, under_repeat) for branch in av[1])
        elif op == _parser.SUBPATTERN:
            count += _open_repeats(av[-1], under_repeat)
        elif op in (_parser.ASSERT, _parser.ASSERT_NOT):
            count += _open_repeats(av[1], under_repeat)
        elif op == getattr(_parser, "ATOMIC_GROUP", None):
            count += _open_repeats(av, under_repeat)
    return count


def pattern_problem(key: str) -> str | None:
    """Why matching `key` could take unbounded time, or None if it is bounded (or no regex)."""
    if _PLAIN.match(key):
        return None
    if len(key) > MAX_KEY_CHARS:
        return f"is {len(key)} characters long (at most {MAX_KEY_CHARS} for a regular expression)"
    try:
        parsed = _parser.parse(key)
    except (re.error, RecursionError, OverflowError):
        return None  # skipped when matching
    try:
        repeats = _open_repeats(parsed, False)
    except _Refused as refused:
        return f"has {refused} (its matching can take exponential time)"
    except RecursionError:
        return "is nested too deeply"
    if repeats > MAX_OPEN_REPEATS:
        return f"has {repeats} variable-length quantifiers (at most {MAX_OPEN_REPEATS})"
    return None


class PatternTable:
    """One config field's pattern keys (`field` names it in messages), checked once:
    `value(module, default)` is PEFT's first match, in bounded time."""

    def __init__(self, field: str, pattern: Mapping[str, float]) -> None:
        self.field = field
        self._entries: list[tuple[str, float, re.Pattern[str]]] = []
        self._spent = 0.0
        for key, value in pattern.items():
            problem = pattern_problem(key)
            if problem is not None:
                raise UnsafePattern(f"{field} key {_show(key)} {problem}")
            try:
                compiled = re.compile(rf"(.*\.)?({key})$")
            except (re.error, RecursionError, OverflowError):
                continue  # PEFT would raise on it; skipped, as always
            self._entries.append((key, value, compiled))

    def value(self, module: str, default: float) -> float:
        for key, value, compiled in self._entries:
            plain = _PLAIN.match(key) is not None
            if plain and (module == key or module.endswith("." + key)):
                return value
            if not plain and len(module) > MAX_PATH_CHARS:
                raise UnsafePattern(
                    f"{self.field} key {_show(key)} is a regular expression and module path {_show(module)} has "
                    f"{len(module)} characters (at most {MAX_PATH_CHARS} are matched against one)"
                )
            started = time.perf_counter()
            found = compiled.match(module)
            self._spent += time.perf_counter() - started
            if self._spent > TIME_BUDGET_S:
                raise UnsafePattern(
                    f"{self.field} key {_show(key)}: matching the pattern keys took over {TIME_BUDGET_S:g} s; refused"
                )
            if found:
                return value
        return default


def _show(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")
