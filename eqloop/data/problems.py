"""Grade-school word problems with known answers, generated offline and deterministically.

For tests and CPU demos of the GSM8K pipeline without downloading GSM8K: each problem is
a short story with one or two arithmetic steps, written in GSM8K's answer format (the
reasoning with ``<<a+b=c>>`` calculator annotations, then ``#### N``), in plain ASCII so
that a character tokenizer reads it. The same ``(n, seed, max_value)`` always gives the
same problems; :func:`make_splits` draws train and test sets without shared questions.

Example::

    train, test = make_splits(1000, 100, seed=0)
    train[0]
    {'question': 'Mia has 12 apples. She buys 7 more. How many apples does Mia have now?',
     'answer': 'Mia has 12 + 7 = <<12+7=19>>19 apples.\\n#### 19'}
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from solvers import checks

__all__ = ["KINDS", "make_problem", "make_problems", "make_splits"]

_NAMES = (
    ("Mia", "She"),
    ("Noah", "He"),
    ("Ava", "She"),
    ("Liam", "He"),
    ("Zoe", "She"),
    ("Omar", "He"),
    ("Lena", "She"),
    ("Ravi", "He"),
    ("Ines", "She"),
    ("Theo", "He"),
)
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards")

Problem = dict[str, str]
_Maker = Callable[[np.random.Generator, int], Problem]


def _person(rng: np.random.Generator) -> tuple[str, str]:
    return _NAMES[int(rng.integers(len(_NAMES)))]


def _item(rng: np.random.Generator) -> str:
    return _ITEMS[int(rng.integers(len(_ITEMS)))]


def _int(rng: np.random.Generator, low: int, high: int) -> int:
    return int(rng.integers(low, high, endpoint=True))


def _problem(question: str, steps: list[str], result: int) -> Problem:
    return {"question": question, "answer": "\n".join(steps) + f"\n#### {result}"}


def _add(rng: np.random.Generator, top: int) -> Problem:
    (name, pronoun), item = _person(rng), _item(rng)
    a, b = _int(rng, 2, top), _int(rng, 2, top)
    return _problem(
        f"{name} has {a} {item}. {pronoun} buys {b} more. How many {item} does {name} have now?",
        [f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {item}."],
        a + b,
    )


def _subtract(rng: np.random.Generator, top: int) -> Problem:
    (name, _), (friend, _), item = _person(rng), _person(rng), _item(rng)
    a = _int(rng, 3, top)
    b = _int(rng, 1, a - 1)
    return _problem(
        f"{name} had {a} {item} and gave {b} of them to {friend}. How many {item} does "
        f"{name} have left?",
        [f"{name} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {item} left."],
        a - b,
    )


def _multiply(rng: np.random.Generator, top: int) -> Problem:
    (name, _), item = _person(rng), _item(rng)
    small = max(2, int(top**0.5))
    a, b = _int(rng, 2, small), _int(rng, 2, small)
    return _problem(
        f"{name} buys {a} boxes of {item}. Each box holds {b} {item}. How many {item} does "
        f"{name} buy?",
        [f"{name} buys {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {item}."],
        a * b,
    )


def _divide(rng: np.random.Generator, top: int) -> Problem:
    (name, _), item = _person(rng), _item(rng)
    small = max(2, int(top**0.5))
    each, friends = _int(rng, 2, small), _int(rng, 2, small)
    total = each * friends
    return _problem(
        f"{name} shares {total} {item} equally among {friends} friends. How many {item} does "
        "each friend get?",
        [f"Each friend gets {total} / {friends} = <<{total}/{friends}={each}>>{each} {item}."],
        each,
    )


def _buy_packs(rng: np.random.Generator, top: int) -> Problem:
    (name, pronoun), item = _person(rng), _item(rng)
    small = max(2, int(top**0.5))
    a, packs, size = _int(rng, 2, top), _int(rng, 2, small), _int(rng, 2, small)
    bought = packs * size
    return _problem(
        f"{name} has {a} {item}. {pronoun} buys {packs} packs with {size} {item} in each pack. "
        f"How many {item} does {name} have now?",
        [
            f"{pronoun} buys {packs} * {size} = <<{packs}*{size}={bought}>>{bought} {item}.",
            f"{name} has {a} + {bought} = <<{a}+{bought}={a + bought}>>{a + bought} {item}.",
        ],
        a + bought,
    )


def _wage(rng: np.random.Generator, top: int) -> Problem:
    (name, pronoun) = _person(rng)
    small = max(2, int(top**0.5))
    rate, hours = _int(rng, 2, small), _int(rng, 2, small)
    earned = rate * hours
    spent = _int(rng, 1, earned - 1)
    left = earned - spent
    return _problem(
        f"{name} earns ${rate} per hour and works {hours} hours. {pronoun} spends ${spent} on "
        f"lunch. How many dollars does {name} have left?",
        [
            f"{name} earns {rate} * {hours} = <<{rate}*{hours}={earned}>>{earned} dollars.",
            f"{pronoun} has {earned} - {spent} = <<{earned}-{spent}={left}>>{left} dollars left.",
        ],
        left,
    )


_KINDS: dict[str, _Maker] = {
    "add": _add,
    "subtract": _subtract,
    "multiply": _multiply,
    "divide": _divide,
    "buy_packs": _buy_packs,
    "wage": _wage,
}
KINDS: tuple[str, ...] = tuple(_KINDS)
"""Problem kinds: one-step add/subtract/multiply/divide, two-step buy_packs and wage."""


def _check_kinds(kinds: tuple[str, ...] | None) -> tuple[str, ...]:
    kinds = KINDS if kinds is None else tuple(kinds)
    if not kinds:
        raise ValueError(f"kinds must name at least one of {list(KINDS)}")
    for kind in kinds:
        checks.choice("kind", kind, KINDS)
    return kinds


def make_problem(rng: np.random.Generator, kind: str, max_value: int = 50) -> Problem:
    """One problem of ``kind`` with operands up to ``max_value`` (products up to about that).

    Returns:
        ``{"question": ..., "answer": "... #### N"}``.
    """
    checks.choice("kind", kind, KINDS)
    return _KINDS[kind](rng, checks.integer("max_value", max_value, low=4))


def make_problems(
    n: int, seed: int, *, max_value: int = 50, kinds: tuple[str, ...] | None = None
) -> list[Problem]:
    """``n`` distinct problems, kinds cycling uniformly at random, deterministic in the seed.

    Args:
        n: number of problems.
        seed: seeds the private NumPy generator.
        max_value: largest operand (see :func:`make_problem`).
        kinds: problem kinds to draw from (default all of :data:`KINDS`).

    Raises:
        ValueError: ``n < 1``, a negative seed, an unknown kind, or fewer than ``n``
            distinct problems in the space (raise ``max_value`` or add kinds).
    """
    n = checks.integer("n", n, low=1)
    seed = checks.integer("seed", seed, low=0)
    kinds = _check_kinds(kinds)
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(
                f"could not draw {n} distinct problems with max_value={max_value} and kinds "
                f"{list(kinds)} ({len(problems)} found); raise max_value or add kinds"
            )
        problem = make_problem(rng, kinds[int(rng.integers(len(kinds)))], max_value)
        if problem["question"] not in seen:
            seen.add(problem["question"])
            problems.append(problem)
    return problems


def make_splits(
    n_train: int,
    n_test: int,
    seed: int,
    *,
    max_value: int = 50,
    kinds: tuple[str, ...] | None = None,
) -> tuple[list[Problem], list[Problem]]:
    """Train and test problems from one draw, so that no question is in both.

    Returns:
        ``(train, test)`` lists of ``n_train`` and ``n_test`` problems.
    """
    n_train = checks.integer("n_train", n_train, low=1)
    n_test = checks.integer("n_test", n_test, low=1)
    problems = make_problems(n_train + n_test, seed, max_value=max_value, kinds=kinds)
    return problems[:n_train], problems[n_train:]
