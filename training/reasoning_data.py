"""Arithmetic and logic word problems with worked step-by-step solutions, generated from a seed (no download).

R²MU's reasoning-preservation term needs *general reasoning traces*: the paper's reference code uses
LIMO's worked math solutions (``GAIR/LIMO``). This project ships its own reasoning task instead, so
that unlearning runs offline: four families of word problems, each with a solution written one
step per line and a final ``Answer:`` line.

* ``shopping``: multi-step arithmetic stories (costs of two purchases, then the change from a note
  or an equal split between friends);
* ``units``: unit conversions followed by a multiplication or division (hours and minutes, metres
  and centimetres, kilograms and grams);
* ``rates``: net rates and times (a tank with a leak, a two-leg ride, pages left to read);
* ``ordering``: who is tallest / youngest / ... from shuffled pairwise comparisons.

Solutions are correct by construction: every number in a step is computed by the generator, and
problems are built backwards from their answer so that every division is exact. The same
``(n, seed)`` always gives the same problems, in the same order, with no duplicate question.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

_NAMES = ["Mia", "Omar", "Lena", "Ravi", "Sofia", "Tariq", "Nina", "Felix", "Hana", "Jonah", "Priya", "Mateo",
          "Chloe", "Kenji", "Amara", "Lucas", "Zoe", "Idris", "Elsa", "Diego", "Maya", "Theo", "Leila", "Sami"]
_ITEMS = [("notebook", "notebooks"), ("pen", "pens"), ("apple", "apples"), ("sandwich", "sandwiches"),
          ("ticket", "tickets"), ("candle", "candles"), ("mug", "mugs"), ("plant", "plants"), ("book", "books"),
          ("scarf", "scarves"), ("battery", "batteries"), ("ball", "balls"), ("jar of honey", "jars of honey"),
          ("loaf of bread", "loaves of bread"), ("box of tea", "boxes of tea"), ("poster", "posters")]
# (comparative, opposite comparative, superlative, opposite superlative)
_SCALES = [("taller", "shorter", "tallest", "shortest"), ("older", "younger", "oldest", "youngest"),
           ("faster", "slower", "fastest", "slowest"), ("heavier", "lighter", "heaviest", "lightest")]


def _n(count: int, unit: str, plural: str | None = None) -> str:
    """``count`` with its unit, singular for one ("1 litre", "3 litres")."""
    return f"{count} {unit if count == 1 else plural or unit + 's'}"


@dataclass(frozen=True)
class ReasoningProblem:
    """One word problem: its family, the question, the worked steps, the final answer and the values it was built from."""

    family: str
    question: str
    steps: tuple[str, ...]
    answer: str
    values: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def solution(self) -> str:
        """The worked solution as the assistant would write it: one step a line, then ``Answer: ...``."""
        return "\n".join(self.steps) + f"\nAnswer: {self.answer}"


def _shopping(rng: random.Random) -> ReasoningProblem:
    """Two purchases, their total, then the change from a note or an equal split."""
    name = rng.choice(_NAMES)
    (s1, p1_name), (s2, p2_name) = rng.sample(_ITEMS, 2)
    split = rng.random() < 0.4
    while True:
        n1, p1, n2, p2 = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 15)
        c1, c2 = n1 * p1, n2 * p2
        total = c1 + c2
        k = rng.randint(2, 5)
        if not split or total % k == 0:
            break
    buy = (f"{name} buys {n1} {p1_name} at {p1} dollars each and {n2} {p2_name} at {p2} dollars each")
    steps = [f"The {p1_name} cost {n1} × {p1} = {c1} dollars.", f"The {p2_name} cost {n2} × {p2} = {c2} dollars.",
             f"Together they cost {c1} + {c2} = {total} dollars."]
    if split:
        share = total // k
        question = f"{buy}, and splits the cost equally among {k} friends. How much does each friend pay?"
        steps.append(f"Each friend pays {total} ÷ {k} = {share} dollars.")
        return ReasoningProblem("shopping", question, tuple(steps), f"{share} dollars",
                                {"kind": "split", "n1": n1, "p1": p1, "n2": n2, "p2": p2, "k": k})
    note = next(x for x in (20, 50, 100, 200, 500) if x > total)
    change = note - total
    question = f"{buy}, and pays with a {note}-dollar note. How much change does {name} get?"
    steps.append(f"The change is {note} - {total} = {change} dollars.")
    return ReasoningProblem("shopping", question, tuple(steps), f"{change} dollars",
                            {"kind": "change", "n1": n1, "p1": p1, "n2": n2, "p2": p2, "note": note})


def _units(rng: random.Random) -> ReasoningProblem:
    """A mixed-unit quantity converted to the small unit, then multiplied or divided."""
    kind = rng.choice(["time", "length", "mass"])
    if kind == "time":
        k, h, m = rng.randint(2, 6), rng.randint(1, 3), rng.randint(5, 55)
        h60 = h * 60
        each = h60 + m
        total = k * each
        question = (f"A festival shows {k} films that each last {_n(h, 'hour')} and {m} minutes. "
                    f"How many minutes of film does it show in total?")
        steps = (f"One hour is 60 minutes, so {_n(h, 'hour')} is {h} × 60 = {h60} minutes.",
                 f"Each film lasts {h60} + {m} = {each} minutes.",
                 f"{k} films last {k} × {each} = {total} minutes.")
        return ReasoningProblem("units", question, steps, f"{total} minutes", {"kind": kind, "k": k, "h": h, "m": m})
    if kind == "length":
        while True:
            k, piece = rng.randint(2, 9), rng.randint(30, 240)
            total = k * piece
            a, b = divmod(total, 100)
            if a >= 1 and b >= 1:
                break
        a100 = a * 100
        question = (f"A rope is {_n(a, 'metre')} and {_n(b, 'centimetre')} long. It is cut into {k} equal "
                    f"pieces. How many centimetres long is each piece?")
        steps = (f"One metre is 100 centimetres, so {_n(a, 'metre')} is {a} × 100 = {a100} centimetres.",
                 f"The rope is {a100} + {b} = {total} centimetres long.",
                 f"Each piece is {total} ÷ {k} = {piece} centimetres long.")
        return ReasoningProblem("units", question, steps, f"{piece} centimetres", {"kind": kind, "a": a, "b": b, "k": k})
    while True:
        use, loaves = rng.randrange(150, 650, 50), rng.randint(3, 20)
        total = use * loaves
        a, b = divmod(total, 1000)
        if a >= 1 and b >= 1:
            break
    a1000 = a * 1000
    question = (f"A baker has {_n(a, 'kilogram')} and {_n(b, 'gram')} of flour and uses {use} grams for "
                f"each loaf. How many loaves can the baker make with all of it?")
    steps = (f"One kilogram is 1000 grams, so {_n(a, 'kilogram')} is {a} × 1000 = {a1000} grams.",
             f"The baker has {a1000} + {b} = {total} grams of flour.",
             f"That makes {total} ÷ {use} = {loaves} loaves.")
    return ReasoningProblem("units", question, steps, f"{loaves} loaves", {"kind": kind, "a": a, "b": b, "use": use})


def _rates(rng: random.Random) -> ReasoningProblem:
    """A net rate then a time, or two legs of a journey, or what is left divided by a daily rate."""
    kind = rng.choice(["tank", "ride", "reading"])
    if kind == "tank":
        d = rng.randint(1, 9)
        f = d + rng.randint(2, 12)
        net, t = f - d, rng.randint(4, 40)
        cap = net * t
        question = (f"An empty tank holds {cap} litres. A pipe fills it at {f} litres per minute while a leak drains "
                    f"{_n(d, 'litre')} per minute. How many minutes does it take to fill the tank?")
        steps = (f"Each minute the tank gains {f} - {d} = {_n(net, 'litre')}.",
                 f"Filling {cap} litres takes {cap} ÷ {net} = {t} minutes.")
        return ReasoningProblem("rates", question, steps, f"{t} minutes", {"kind": kind, "cap": cap, "f": f, "d": d})
    if kind == "ride":
        s1, h1, s2, h2 = rng.randint(8, 30), rng.randint(1, 5), rng.randint(8, 30), rng.randint(1, 5)
        d1, d2 = s1 * h1, s2 * h2
        name = rng.choice(_NAMES)
        question = (f"{name} cycles at {s1} kilometres per hour for {_n(h1, 'hour')}, then at {s2} "
                    f"kilometres per hour for {_n(h2, 'hour')}. How many kilometres does {name} ride?")
        steps = (f"The first part covers {s1} × {h1} = {d1} kilometres.",
                 f"The second part covers {s2} × {h2} = {d2} kilometres.",
                 f"In total {name} rides {d1} + {d2} = {d1 + d2} kilometres.")
        return ReasoningProblem("rates", question, steps, f"{d1 + d2} kilometres",
                                {"kind": kind, "s1": s1, "h1": h1, "s2": s2, "h2": h2})
    name = rng.choice(_NAMES)
    per_day, days, done = rng.randint(5, 40), rng.randint(2, 15), rng.randint(10, 200)
    left = per_day * days
    pages = done + left
    question = (f"A book has {pages} pages. {name} has already read {done} pages and reads {per_day} pages a day. "
                f"How many more days does {name} need to finish the book?")
    steps = (f"{name} still has {pages} - {done} = {left} pages to read.",
             f"At {per_day} pages a day that takes {left} ÷ {per_day} = {days} days.")
    return ReasoningProblem("rates", question, steps, f"{days} days",
                            {"kind": kind, "pages": pages, "done": done, "per_day": per_day})


def _ordering(rng: random.Random) -> ReasoningProblem:
    """Shuffled comparisons of adjacent people in a hidden order; ask for one end of the order."""
    k = rng.randint(3, 5)
    order = rng.sample(_NAMES, k)  # from most to least
    more, less, most, least = rng.choice(_SCALES)
    facts = []
    for a, b in zip(order, order[1:], strict=False):
        facts.append((a, b, rng.random() < 0.5))  # flipped: written as "b is <less> than a"
    rng.shuffle(facts)
    stated = [f"{b} is {less} than {a}." if flip else f"{a} is {more} than {b}." for a, b, flip in facts]
    top = rng.random() < 0.5
    question = " ".join(stated) + f" Who is the {most if top else least}?"
    steps = [f"\"{b} is {less} than {a}\" means {a} is {more} than {b}." if flip else f"{a} is {more} than {b}."
             for a, b, flip in facts]
    steps.append(f"Chaining these, from {most} to {least}: {', '.join(order)}.")
    answer = order[0] if top else order[-1]
    steps.append(f"So the {most if top else least} is {answer}.")
    return ReasoningProblem("ordering", question, tuple(steps), answer,
                            {"order": list(order), "scale": more, "ask": "top" if top else "bottom"})


FAMILIES: dict[str, Callable[[random.Random], ReasoningProblem]] = {
    "shopping": _shopping, "units": _units, "rates": _rates, "ordering": _ordering}
"""Problem families by name: each draws one problem from its own seeded random generator."""


def reasoning_problems(n: int = 300, seed: int = 0, families: Sequence[str] | None = None) -> list[ReasoningProblem]:
    """``n`` distinct problems, the families taken in turn, deterministic in ``(n, seed, families)``."""
    names = list(families) if families is not None else list(FAMILIES)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown reasoning families {unknown or names}; known: {', '.join(FAMILIES)}")
    rngs = {f: random.Random(f"reasoning:{seed}:{f}") for f in names}
    out: list[ReasoningProblem] = []
    seen: set[str] = set()
    misses = 0
    while len(out) < n:
        fam = names[len(out) % len(names)]
        p = FAMILIES[fam](rngs[fam])
        if p.question in seen:
            misses += 1
            if misses > 100 * n:
                raise ValueError(f"could not draw {n} distinct problems from {names}")
            continue
        seen.add(p.question)
        out.append(p)
    return out
