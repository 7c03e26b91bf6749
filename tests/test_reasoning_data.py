"""The shipped reasoning task: deterministic per seed, every family present, no duplicates, every solution correct."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from training.reasoning_data import FAMILIES, ReasoningProblem, reasoning_problems

PROBLEMS = reasoning_problems(400, seed=0)
_OPS = {"×": lambda a, b: a * b, "+": lambda a, b: a + b, "-": lambda a, b: a - b}


def _int(pattern: str, text: str) -> list[int]:
    m = re.search(pattern, text)
    assert m, (pattern, text)
    return [int(g) for g in m.groups()]


def _exact(a: int, b: int) -> int:
    assert a % b == 0, (a, b)
    return a // b


def recompute(p: ReasoningProblem) -> str:
    """The answer, recomputed from the question text alone (not from the generator's values)."""
    q = p.question
    if p.family == "shopping":
        n1, p1, n2, p2 = _int(r"buys (\d+) .+? at (\d+) dollars each and (\d+) .+? at (\d+) dollars each", q)
        total = n1 * p1 + n2 * p2
        if "splits" in q:
            k = _int(r"among (\d+) friends", q)[0]
            return f"{_exact(total, k)} dollars"
        note = _int(r"pays with a (\d+)-dollar note", q)[0]
        assert note > total
        return f"{note - total} dollars"
    if p.family == "units":
        if "films" in q:
            k, h, m = _int(r"shows (\d+) films that each last (\d+) hours? and (\d+) minutes", q)
            return f"{k * (h * 60 + m)} minutes"
        if "rope" in q:
            a, b, k = _int(r"(\d+) metres? and (\d+) centimetres? long\. It is cut into (\d+)", q)
            return f"{_exact(a * 100 + b, k)} centimetres"
        a, b, use = _int(r"(\d+) kilograms? and (\d+) grams? of flour and uses (\d+) grams", q)
        return f"{_exact(a * 1000 + b, use)} loaves"
    if p.family == "rates":
        if "tank" in q:
            cap, f, d = _int(r"holds (\d+) litres\. A pipe fills it at (\d+) litres per minute .*? drains (\d+)", q)
            return f"{_exact(cap, f - d)} minutes"
        if "cycles" in q:
            s1, h1, s2, h2 = _int(r"at (\d+) kilometres per hour for (\d+) hours?, then at (\d+) kilometres per hour "
                                  r"for (\d+) hours?", q)
            return f"{s1 * h1 + s2 * h2} kilometres"
        pages, done, per_day = _int(r"has (\d+) pages\. \w+ has already read (\d+) pages and reads (\d+) pages", q)
        return f"{_exact(pages - done, per_day)} days"
    assert p.family == "ordering"
    above: dict[str, set[str]] = {}  # person -> people directly "more" than them
    people: set[str] = set()
    asked = re.search(r"Who is the (\w+)\?", q).group(1)
    scale = next(s for s in [("taller", "shorter", "tallest", "shortest"), ("older", "younger", "oldest", "youngest"),
                             ("faster", "slower", "fastest", "slowest"), ("heavier", "lighter", "heaviest", "lightest")]
                 if asked in s)
    for a, comp, b in re.findall(r"(\w+) is (\w+) than (\w+)\.", q):
        big, small = (a, b) if comp == scale[0] else (b, a)
        assert comp in scale[:2]
        above.setdefault(small, set()).add(big)
        people |= {a, b}
    below = {x for s in above.values() for x in s}
    if asked == scale[2]:
        top = [x for x in people if x not in above]
        assert len(top) == 1
        return top[0]
    bottom = [x for x in people if x not in below]
    assert len(bottom) == 1
    return bottom[0]


def test_same_seed_same_problems_other_seed_other_problems():
    again = reasoning_problems(400, seed=0)
    assert [(p.question, p.solution) for p in again] == [(p.question, p.solution) for p in PROBLEMS]
    other = reasoning_problems(400, seed=1)
    assert len({p.question for p in other} & {p.question for p in PROBLEMS}) < 40
    assert reasoning_problems(50, seed=0) == PROBLEMS[:50]  # a prefix does not depend on n


def test_every_family_present_in_turn_and_no_duplicates():
    counts = Counter(p.family for p in PROBLEMS)
    assert set(counts) == set(FAMILIES) and len(FAMILIES) >= 4
    assert set(counts.values()) == {400 // len(FAMILIES)}
    assert [p.family for p in PROBLEMS[:8]] == list(FAMILIES) * 2
    assert len({p.question for p in PROBLEMS}) == len(PROBLEMS)
    kinds = Counter(p.values.get("kind") for p in PROBLEMS if p.family != "ordering")
    assert len(kinds) == 8  # every sub-kind of the arithmetic families occurs
    only = reasoning_problems(30, seed=3, families=["ordering"])
    assert {p.family for p in only} == {"ordering"}
    with pytest.raises(ValueError, match="known: shopping"):
        reasoning_problems(3, families=["calculus"])


def test_every_solution_is_correct_step_by_step_and_in_the_end():
    equations = 0
    for p in PROBLEMS:
        assert recompute(p) == p.answer, (p.question, p.solution)
        assert p.solution.splitlines()[-1] == f"Answer: {p.answer}"
        assert len(p.steps) >= 2
        for a, op, b, c in re.findall(r"(\d+) ([×÷+-]) (\d+) = (\d+)", p.solution):
            a, b, c = int(a), int(b), int(c)
            assert (a == b * c) if op == "÷" else (_OPS[op](a, b) == c), (p.question, a, op, b, c)
            equations += 1
        if p.family != "ordering":
            assert re.search(r"\d+ [×÷+-] \d+ = \d+", p.solution), p.solution
        else:
            assert p.answer in p.steps[-1] and p.answer in p.question
    assert equations > 2 * len(PROBLEMS) * 3 // 4
