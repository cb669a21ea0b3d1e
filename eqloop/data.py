"""Arithmetic tasks as Hugging Face ``datasets.Dataset`` objects, and local QA files.

Every example is one character sequence::

    <bos> question = answer <eos>          e.g.  <bos>0123+4567=09640<eos>

``question`` is the problem (``0123+4567``), ``answer`` the target text (``09640``: the
sum 4690 zero-padded to five digits and written least-significant digit first, as in
STARS). Every dataset, generated or loaded, has the same columns:

* ``question`` (str), ``answer`` (str);
* ``input_ids`` (list[int32]): the whole sequence, ``<bos>`` to ``<eos>``;
* ``labels`` (list[int32]): ``input_ids`` with ``-100`` on the prompt (``<bos>`` up to and
  including ``=``), so the loss covers only the answer and ``<eos>``;
* ``prompt_len`` (int32): the number of prompt tokens.

With ``zero_pad=True`` (the default) every row of a generated dataset has the same length,
so batches stack without padding. :func:`to_tensors` turns a dataset into shifted
next-token ``(inputs, targets)`` tensors, and :func:`eval_prompts` gives the prompts and
answer strings for greedy-decoding exact-match evaluation.

Generated datasets are deterministic in their configuration, carry a fingerprint derived
from it and are cached on disk (``cache_dir``, by default ``$EQLOOP_CACHE_DIR``, else
``$XDG_CACHE_HOME/eqloop``, else ``~/.cache/eqloop``). Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import string
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.table import InMemoryTable
from torch import Tensor

__all__ = [
    "ARITHMETIC_CHARS",
    "IGNORE_INDEX",
    "SEPARATOR",
    "SPECIAL_TOKENS",
    "SPLITS",
    "TASKS",
    "CharTokenizer",
    "default_cache_dir",
    "eval_prompts",
    "load_qa_jsonl",
    "make_arithmetic_dataset",
    "to_tensors",
]

TASKS: tuple[str, ...] = ("addition", "multiplication", "chain_addition")
SPLITS: tuple[str, ...] = ("train", "test", "ood")
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2
ARITHMETIC_CHARS = "0123456789+-*=, "  # ids 3.. in every CharTokenizer
IGNORE_INDEX = -100  # label of positions the loss skips (torch's cross-entropy default)
SEPARATOR = "="  # between question and answer

# Bump when the text or token layout of examples changes: it invalidates cached datasets.
_FORMAT_VERSION = 1
_FEATURES = datasets.Features(
    {
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "prompt_len": datasets.Value("int32"),
    }
)
# Problem spaces up to this size are enumerated when the request is a large share of them.
_ENUMERATION_LIMIT = 1_000_000
# Candidate problems drawn per round of rejection sampling.
_DRAW_CHUNK = 4096
# Operands are drawn in blocks of at most this many decimal digits (int64-safe).
_BLOCK_DIGITS = 18
_OPERATORS = {"addition": "+", "multiplication": "*", "chain_addition": "+"}


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CharTokenizer:
    """One token per character, plus the special tokens ``<pad>``, ``<bos>``, ``<eos>``.

    The vocabulary is ``SPECIAL_TOKENS + ARITHMETIC_CHARS + extra_chars``, so the ids of
    the arithmetic characters are the same in every ``CharTokenizer``: a model trained on
    arithmetic reads them the same way under a larger vocabulary.

    Args:
        extra_chars: characters appended to the vocabulary (no repeats, none of
            ``ARITHMETIC_CHARS``). :meth:`printable` adds all printable ASCII.
    """

    extra_chars: str = ""
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        chars = ARITHMETIC_CHARS + self.extra_chars
        repeated = sorted({c for c in chars if chars.count(c) > 1})
        if repeated:
            raise ValueError(
                f"extra_chars repeats characters already in the vocabulary: {repeated}"
            )
        offset = len(SPECIAL_TOKENS)
        object.__setattr__(self, "_ids", {c: offset + i for i, c in enumerate(chars)})

    @classmethod
    def printable(cls) -> CharTokenizer:
        """A tokenizer for general text: printable ASCII, tab and newline."""
        extra = "".join(c for c in string.printable if c not in ARITHMETIC_CHARS + "\r\x0b\x0c")
        return cls(extra_chars=extra)

    @property
    def chars(self) -> str:
        """The non-special characters, in id order (the first has id ``len(SPECIAL_TOKENS)``)."""
        return ARITHMETIC_CHARS + self.extra_chars

    @property
    def vocab(self) -> tuple[str, ...]:
        """Every token, indexed by id."""
        return SPECIAL_TOKENS + tuple(self.chars)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included)."""
        return len(SPECIAL_TOKENS) + len(self.chars)

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>``."""
        return 0

    @property
    def bos_id(self) -> int:
        """Id of ``<bos>``."""
        return 1

    @property
    def eos_id(self) -> int:
        """Id of ``<eos>``."""
        return 2

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, one per character.

        Raises:
            ValueError: a character of ``text`` is not in the vocabulary (the message names
                it and its position).
        """
        try:
            ids = [self._ids[c] for c in text]
        except KeyError:
            position, char = next((i, c) for i, c in enumerate(text) if c not in self._ids)
            raise ValueError(
                f"character {char!r} (U+{ord(char):04X}) at position {position} is not in the "
                "tokenizer vocabulary; add it with CharTokenizer(extra_chars=...)"
            ) from None
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(
        self, ids: Iterable[int], *, skip_special: bool = True, stop_at_eos: bool = False
    ) -> str:
        """Text of token ids (ints or 0-d tensors); ``decode(encode(s)) == s``.

        Args:
            ids: token ids.
            skip_special: drop ``<pad>``, ``<bos>`` and ``<eos>`` instead of writing them out.
            stop_at_eos: ignore everything from the first ``<eos>`` on (for generations).

        Raises:
            ValueError: an id is outside ``[0, vocab_size)``.
        """
        vocab = self.vocab
        pieces = []
        for raw in ids:
            token = int(raw)
            if not 0 <= token < len(vocab):
                raise ValueError(f"token id {token} is outside the vocabulary [0, {len(vocab)})")
            if stop_at_eos and token == self.eos_id:
                break
            if not (skip_special and token < len(SPECIAL_TOKENS)):
                pieces.append(vocab[token])
        return "".join(pieces)


def _encode_examples(
    tokenizer: CharTokenizer, examples: Iterable[tuple[str, str, str]]
) -> dict[str, list[Any]]:
    """Columns of the common dataset form (see the module docstring).

    Args:
        tokenizer: the character tokenizer.
        examples: ``(question, answer, where)`` triples; ``where`` locates the example in
            error messages (e.g. ``"data.jsonl:12"``).

    Raises:
        ValueError: a character outside the vocabulary, reported with ``where`` and field.
    """
    columns: dict[str, list[Any]] = {name: [] for name in _FEATURES}
    separator = tokenizer.encode(SEPARATOR)
    for question, answer, where in examples:
        try:
            prompt = [tokenizer.bos_id] + tokenizer.encode(question) + separator
        except ValueError as err:
            raise ValueError(f"{where}: question: {err}") from None
        try:
            target = tokenizer.encode(answer) + [tokenizer.eos_id]
        except ValueError as err:
            raise ValueError(f"{where}: answer: {err}") from None
        columns["question"].append(question)
        columns["answer"].append(answer)
        columns["input_ids"].append(prompt + target)
        columns["labels"].append([IGNORE_INDEX] * len(prompt) + target)
        columns["prompt_len"].append(len(prompt))
    return columns


def _build_dataset(
    columns: dict[str, list[Any]], *, fingerprint: str, description: str, split: str | None
) -> datasets.Dataset:
    """A ``datasets.Dataset`` in the common form with the given fingerprint."""
    table = InMemoryTable(pa.Table.from_pydict(columns, schema=_FEATURES.arrow_schema))
    info = datasets.DatasetInfo(description=description, features=_FEATURES)
    named_split = datasets.NamedSplit(split) if split is not None else None
    return datasets.Dataset(table, info=info, split=named_split, fingerprint=fingerprint)


def _digest(payload: str | bytes, *, size: int = 8) -> str:
    """Hex BLAKE2b digest of ``payload`` (``2 * size`` characters)."""
    data = payload.encode() if isinstance(payload, str) else payload
    return hashlib.blake2b(data, digest_size=size).hexdigest()


# ---------------------------------------------------------------------------------------
# Arithmetic problems
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ArithmeticSpec:
    """A validated request of :func:`make_arithmetic_dataset` (see its arguments)."""

    task: str
    digits: int
    n: int
    seed: int
    split: str
    reverse_answer: bool
    zero_pad: bool
    terms: int
    ood_digits: int
    test_fraction: float

    @property
    def width(self) -> int:
        """Digits per operand: ``ood_digits`` for the ood split, ``digits`` otherwise."""
        return self.ood_digits if self.split == "ood" else self.digits

    @property
    def answer_width(self) -> int:
        """Digits of the largest possible result at this operand width."""
        largest = 10**self.width - 1
        return len(str(_evaluate(self.task, (largest,) * self.terms)))

    def problem_key(self) -> dict[str, Any]:
        """Everything that decides which problems are drawn, in which order (not ``n``)."""
        key = {"task": self.task, "terms": self.terms, "digits": self.digits, "split": self.split}
        if self.split == "ood":
            key["ood_digits"] = self.ood_digits
        else:
            key["test_fraction"] = self.test_fraction
        return {**key, "seed": self.seed}

    def fingerprint(self) -> str:
        """Hash of everything that decides the dataset's rows."""
        config = {**asdict(self), "format_version": _FORMAT_VERSION}
        unused = "test_fraction" if self.split == "ood" else "ood_digits"
        config[unused] = None  # it does not affect this split's rows
        return _digest(json.dumps(config, sort_keys=True))

    def capacity(self) -> float:
        """Expected number of distinct problems (ordered operand tuples) in the split."""
        space = 10.0 ** (self.width * self.terms)
        if self.split == "ood":
            return space * (1.0 - 10.0 ** ((self.digits - self.ood_digits) * self.terms))
        share = self.test_fraction if self.split == "test" else 1.0 - self.test_fraction
        return space * share


def _evaluate(task: str, operands: tuple[int, ...]) -> int:
    """The exact result of a problem."""
    return math.prod(operands) if task == "multiplication" else sum(operands)


def _hash_split(task: str, operands: tuple[int, ...], test_fraction: float) -> str:
    """``"test"`` or ``"train"`` from a hash of the problem, independent of any seed.

    The operands are sorted first (all tasks are commutative), so ``a+b`` and ``b+a`` share
    a split and a train set never holds a mere reordering of a test problem.
    """
    key = f"{task}:{','.join(map(str, sorted(operands)))}"
    unit = int(_digest(key), 16) / 2.0**64
    return "test" if unit < test_fraction else "train"


def _belongs(spec: _ArithmeticSpec, operands: tuple[int, ...]) -> bool:
    """Whether a problem drawn at ``spec.width`` digits belongs to ``spec.split``.

    An ood problem has at least one operand longer than ``spec.digits`` digits, so it is
    never a train or test problem.
    """
    if spec.split == "ood":
        return max(operands) >= 10**spec.digits
    return _hash_split(spec.task, operands, spec.test_fraction) == spec.split


def _draw_operands(
    rng: np.random.Generator, count: int, terms: int, width: int
) -> list[tuple[int, ...]]:
    """``count`` tuples of ``terms`` operands, each uniform on ``[0, 10**width)``."""
    values = np.zeros((count, terms), dtype=object)
    remaining = width
    while remaining > 0:
        block = min(remaining, _BLOCK_DIGITS)
        draws = rng.integers(0, 10**block, size=(count, terms), dtype=np.int64)
        values = values * 10**block + draws.astype(object)
        remaining -= block
    return [tuple(row) for row in values.tolist()]


def _rejection_sample(spec: _ArithmeticSpec, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """``spec.n`` distinct problems of the split, drawn until enough are accepted."""
    seen: set[tuple[int, ...]] = set()
    problems: list[tuple[int, ...]] = []
    while len(problems) < spec.n:
        for operands in _draw_operands(rng, _DRAW_CHUNK, spec.terms, spec.width):
            if operands in seen or not _belongs(spec, operands):
                continue
            seen.add(operands)
            problems.append(operands)
            if len(problems) == spec.n:
                break
    return problems


def _enumerate_sample(spec: _ArithmeticSpec, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """``spec.n`` distinct problems chosen from a full enumeration of the split.

    Raises:
        ValueError: the split has fewer than ``spec.n`` distinct problems.
    """
    pool = [
        operands
        for operands in itertools.product(range(10**spec.width), repeat=spec.terms)
        if _belongs(spec, operands)
    ]
    if len(pool) < spec.n:
        raise ValueError(
            f"only {len(pool)} distinct {spec.task} problems with {spec.width}-digit operands "
            f"fall in split {spec.split!r}, but n={spec.n} were requested; "
            "use more digits or a smaller n"
        )
    return [pool[i] for i in rng.choice(len(pool), size=spec.n, replace=False)]


def _sample_problems(spec: _ArithmeticSpec) -> list[tuple[int, ...]]:
    """``spec.n`` distinct problems of the split, deterministic in ``spec``.

    Raises:
        ValueError: the split has fewer than ``spec.n`` problems, or ``spec.n`` is more than
            a quarter of a split too large to enumerate.
    """
    key = json.dumps(spec.problem_key(), sort_keys=True)
    rng = np.random.default_rng([spec.seed, int(_digest(key), 16)])
    if spec.n <= spec.capacity() / 4:
        return _rejection_sample(spec, rng)
    if 10 ** (spec.width * spec.terms) <= _ENUMERATION_LIMIT:
        return _enumerate_sample(spec, rng)
    raise ValueError(
        f"n={spec.n} is more than a quarter of the ~{spec.capacity():.3g} distinct "
        f"{spec.task} problems in split {spec.split!r}; use more digits or a smaller n"
    )


def _format_problem(spec: _ArithmeticSpec, operands: tuple[int, ...]) -> tuple[str, str]:
    """(question, answer) text of one problem, e.g. ``("0123+4567", "09640")``."""
    width = spec.width if spec.zero_pad else 0
    answer_width = spec.answer_width if spec.zero_pad else 0
    question = _OPERATORS[spec.task].join(str(x).zfill(width) for x in operands)
    answer = str(_evaluate(spec.task, operands)).zfill(answer_width)
    return question, answer[::-1] if spec.reverse_answer else answer


def _check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {name}={value}")
    return int(value)


def _make_spec(
    task: str,
    digits: int,
    n: int,
    seed: int,
    *,
    split: str,
    reverse_answer: bool,
    zero_pad: bool,
    terms: int | None,
    ood_digits: int | None,
    test_fraction: float,
) -> _ArithmeticSpec:
    """Validate the arguments of :func:`make_arithmetic_dataset`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {list(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
    digits = _check_positive_int("digits", digits)
    n = _check_positive_int("n", n)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if task == "chain_addition":
        terms = 3 if terms is None else _check_positive_int("terms", terms)
        if terms < 2:
            raise ValueError(f"chain_addition needs terms >= 2, got terms={terms}")
    elif terms is not None:
        raise ValueError(f"terms applies only to task 'chain_addition', not {task!r}")
    ood_digits = digits + 1 if ood_digits is None else _check_positive_int("ood_digits", ood_digits)
    if ood_digits <= digits:
        raise ValueError(f"ood_digits must exceed digits={digits}, got ood_digits={ood_digits}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    return _ArithmeticSpec(
        task=task,
        digits=digits,
        n=n,
        seed=int(seed),
        split=split,
        reverse_answer=bool(reverse_answer),
        zero_pad=bool(zero_pad),
        terms=terms if task == "chain_addition" else 2,
        ood_digits=ood_digits,
        test_fraction=float(test_fraction),
    )


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$EQLOOP_CACHE_DIR``, else ``$XDG_CACHE_HOME/eqloop``, else ``~/.cache/eqloop``."""
    if os.environ.get("EQLOOP_CACHE_DIR"):
        return Path(os.environ["EQLOOP_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "eqloop"


@contextlib.contextmanager
def _progress_bars_off() -> Iterator[None]:
    """Silence ``datasets`` progress bars inside the block, restoring the setting after."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _save_atomically(dataset: datasets.Dataset, target: Path) -> None:
    """Write ``dataset`` to ``target`` through a temporary directory and one rename.

    If another process wrote ``target`` first, its copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with _progress_bars_off():
            dataset.save_to_disk(str(staging / "data"))
        try:
            os.replace(staging / "data", target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_cached(path: Path, fingerprint: str) -> datasets.Dataset:
    """A dataset saved by :func:`_save_atomically`, memory-mapped, with its fingerprint."""
    with _progress_bars_off():
        loaded = datasets.load_from_disk(str(path))
    # load_from_disk re-derives the fingerprint through with_format; restore ours.
    return datasets.Dataset(
        loaded.data, info=loaded.info, split=loaded.split, fingerprint=fingerprint
    )


# ---------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------


def make_arithmetic_dataset(
    task: str,
    digits: int,
    n: int,
    seed: int,
    *,
    split: str = "train",
    reverse_answer: bool = True,
    zero_pad: bool = True,
    terms: int | None = None,
    ood_digits: int | None = None,
    test_fraction: float = 0.1,
    cache_dir: str | os.PathLike[str] | None = None,
) -> datasets.Dataset:
    """``n`` distinct arithmetic problems as a ``datasets.Dataset`` in the common form.

    Tasks (operands uniform on ``[0, 10**digits)``):

    * ``addition``: ``a+b``; the answer has up to ``digits + 1`` digits.
    * ``multiplication``: ``a*b``; up to ``2 * digits`` digits.
    * ``chain_addition``: ``a+b+c...`` with ``terms`` operands (default 3), a multi-step
      problem whose answer is the final sum.

    Splits: every problem is assigned to ``train`` or ``test`` by a hash of the problem
    itself (not of the seed), with probability ``test_fraction`` of ``test``, so any train
    set and any test set are disjoint whatever their seeds and sizes (given the same
    ``test_fraction``). ``ood`` problems have ``ood_digits``-digit operands (default
    ``digits + 1``), at least one of them longer than ``digits`` digits, so they never
    occur in train or test.

    Args:
        task: one of :data:`TASKS`.
        digits: operand length of train and test problems (>= 1).
        n: number of distinct problems (>= 1).
        seed: seed of the draw (non-negative).
        split: one of :data:`SPLITS`.
        reverse_answer: write the answer least-significant digit first (STARS).
        zero_pad: write operands with exactly ``width`` digits and the answer with the
            largest result's digit count, so all rows have one length; if False, numbers
            are written without leading zeros and rows vary in length.
        terms: operands of ``chain_addition`` (>= 2; default 3); other tasks take none.
        ood_digits: operand length of the ``ood`` split (> ``digits``).
        test_fraction: share of all problems that belongs to ``test``, in (0, 1).
        cache_dir: where datasets are cached; defaults to :func:`default_cache_dir`.

    Returns:
        A memory-mapped dataset with columns ``question``, ``answer``, ``input_ids``,
        ``labels``, ``prompt_len`` (token ids from the default :class:`CharTokenizer`,
        which every ``CharTokenizer`` shares). Its fingerprint is a hash of the
        configuration, so the same arguments give the same fingerprint and rows.

    Raises:
        ValueError: unknown task or split, ``digits < 1``, ``n < 1``, a bad seed, terms,
            ood_digits or test_fraction, or fewer than ``n`` distinct problems in the
            split (the message gives the number available; nothing is capped silently).
    """
    spec = _make_spec(
        task,
        digits,
        n,
        seed,
        split=split,
        reverse_answer=reverse_answer,
        zero_pad=zero_pad,
        terms=terms,
        ood_digits=ood_digits,
        test_fraction=test_fraction,
    )
    fingerprint = spec.fingerprint()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "datasets" / f"{task}-d{spec.width}-{split}-n{n}-{fingerprint}"
    if not path.is_dir():
        examples = (
            (*_format_problem(spec, operands), f"problem {operands}")
            for operands in _sample_problems(spec)
        )
        columns = _encode_examples(CharTokenizer(), examples)
        description = json.dumps({**asdict(spec), "format_version": _FORMAT_VERSION})
        dataset = _build_dataset(
            columns, fingerprint=fingerprint, description=description, split=split
        )
        _save_atomically(dataset, path)
    return _load_cached(path, fingerprint)


def _qa_field(record: dict[str, Any], key: str, where: str) -> str:
    """``record[key]`` as text (numbers are converted), or ``ValueError`` citing ``where``."""
    if key not in record:
        raise ValueError(f"{where}: missing key {key!r} (keys present: {sorted(record)})")
    value = record[key]
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: {key!r} must be a string or number, got {type(value).__name__}")


def load_qa_jsonl(
    path: str | os.PathLike[str],
    *,
    question_key: str = "question",
    answer_key: str = "answer",
    tokenizer: CharTokenizer | None = None,
) -> datasets.Dataset:
    """Load a local JSONL file of question/answer pairs into the common dataset form.

    One JSON object per line (blank lines are skipped), e.g. a GSM8K file::

        {"question": "Natalia sold clips to ...", "answer": "Natalia sold ... #### 72"}

    Args:
        path: the JSONL file.
        question_key: field holding the question.
        answer_key: field holding the answer (numbers are converted to text).
        tokenizer: tokenizer for ``input_ids``/``labels``; defaults to
            :meth:`CharTokenizer.printable`.

    Returns:
        An in-memory dataset with columns ``question``, ``answer``, ``input_ids``,
        ``labels``, ``prompt_len``; its fingerprint hashes the file, keys and vocabulary.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no records, or a line is not valid JSON, not an object,
            lacks a key, has a non-text value or a character outside the tokenizer's
            vocabulary (each message gives ``path:line``).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no such JSONL file: {file}")
    tokenizer = tokenizer if tokenizer is not None else CharTokenizer.printable()
    raw = file.read_bytes()
    examples = []
    for number, line in enumerate(raw.decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        question = _qa_field(record, question_key, where)
        examples.append((question, _qa_field(record, answer_key, where), where))
    if not examples:
        raise ValueError(f"{file} contains no records")
    columns = _encode_examples(tokenizer, examples)
    config = {
        "file": _digest(raw, size=16),
        "keys": [question_key, answer_key],
        "chars": tokenizer.chars,
        "format_version": _FORMAT_VERSION,
    }
    return _build_dataset(
        columns,
        fingerprint=_digest(json.dumps(config, sort_keys=True)),
        description=json.dumps({"source": str(file), **config}),
        split=None,
    )


def _numpy_column(dataset: datasets.Dataset, name: str) -> np.ndarray:
    """One column as NumPy: 1-D for scalars; for lists, 2-D if all rows have one length,
    else a 1-D object array of 1-D arrays (much faster than Python formatting)."""
    return dataset.with_format("numpy", columns=[name])[:][name]


def to_tensors(
    dataset: datasets.Dataset, tokenizer: CharTokenizer, seq_len: int | None = None
) -> tuple[Tensor, Tensor]:
    """Next-token training tensors from a dataset in the common form.

    Row ``i`` of length ``L`` gives ``inputs[i, :L-1] = input_ids[:-1]`` and
    ``targets[i, :L-1] = labels[1:]``; the rest is ``pad_id`` / ``-100``. So
    ``cross_entropy(logits.flatten(0, 1), targets.flatten())`` (ignore index -100) is the
    loss on the answer and ``<eos>`` only.

    Args:
        dataset: rows with ``input_ids`` and ``labels``.
        tokenizer: supplies ``pad_id``.
        seq_len: sequence length ``S``; defaults to the longest row minus one.

    Returns:
        ``inputs`` (N, S) int64 and ``targets`` (N, S) int64.

    Raises:
        ValueError: empty dataset, or a row longer than ``seq_len + 1`` tokens.
    """
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    ids, labels = _numpy_column(dataset, "input_ids"), _numpy_column(dataset, "labels")
    lengths = [len(row) - 1 for row in ids]
    longest = max(lengths)
    width = longest if seq_len is None else seq_len
    if longest > width:
        raise ValueError(f"a row needs {longest} positions but seq_len={seq_len}")
    inputs = torch.full((len(lengths), width), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(lengths), width), IGNORE_INDEX, dtype=torch.long)
    if ids.ndim == 2:  # equal lengths: one copy
        inputs[:, :longest] = torch.from_numpy(ids[:, :-1].astype(np.int64))
        targets[:, :longest] = torch.from_numpy(labels[:, 1:].astype(np.int64))
        return inputs, targets
    for i, (row_ids, row_labels, length) in enumerate(zip(ids, labels, lengths, strict=True)):
        inputs[i, :length] = torch.as_tensor(row_ids[:-1], dtype=torch.long)
        targets[i, :length] = torch.as_tensor(row_labels[1:], dtype=torch.long)
    return inputs, targets


def eval_prompts(dataset: datasets.Dataset) -> tuple[Tensor, list[str]]:
    """Prompts and reference answers for greedy-decoding exact-match evaluation.

    Feed ``prompts``, generate ``len(answer) + 1`` tokens greedily, and compare
    ``tokenizer.decode(generated, stop_at_eos=True)`` with the answer string.

    Args:
        dataset: rows in the common form, all with the same ``prompt_len`` (true for
            generated datasets with ``zero_pad=True``; otherwise group rows by
            ``prompt_len`` with ``dataset.filter`` first).

    Returns:
        ``prompts`` (N, P) int64, ``<bos>`` up to and including ``=``, and the N answers.

    Raises:
        ValueError: empty dataset, or prompts of different lengths.
    """
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    prompt_lens = set(_numpy_column(dataset, "prompt_len").tolist())
    if len(prompt_lens) > 1:
        raise ValueError(
            f"prompts have different lengths {sorted(prompt_lens)}; evaluate one length at a "
            "time (dataset.filter on prompt_len) or generate with zero_pad=True"
        )
    (length,) = prompt_lens
    ids = _numpy_column(dataset, "input_ids")
    # Rows of equal length come as one 2-D array; ragged rows as an array of arrays.
    prompts = ids[:, :length] if ids.ndim == 2 else np.stack([row[:length] for row in ids])
    answers = dataset.with_format("arrow", columns=["answer"])[:]["answer"].to_pylist()
    return torch.from_numpy(prompts.astype(np.int64)), answers
