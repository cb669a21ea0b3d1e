"""Arithmetic tasks and local QA files in one common form of tokenized examples.

Every example is one character sequence::

    <bos> question = answer <eos>          e.g.  <bos>0123+4567=09640<eos>

``question`` is the problem (``0123+4567``), ``answer`` the target text (``09640``: the
sum 4690 zero-padded to five digits and written least-significant digit first, as in
STARS). Every set of examples, generated or loaded, has the same columns:

* ``question`` (str), ``answer`` (str);
* ``input_ids`` (list[int32]): the whole sequence, ``<bos>`` to ``<eos>``;
* ``labels`` (list[int32]): ``input_ids`` with ``-100`` on the prompt (``<bos>`` up to and
  including ``=``), so the loss covers only the answer and ``<eos>``;
* ``prompt_len`` (int32): the number of prompt tokens.

They come in two containers holding the same rows: :class:`Examples` (NumPy arrays; what
training and evaluation read, so neither needs more than NumPy and torch) and a Hugging
Face ``datasets.Dataset`` (:func:`make_arithmetic_dataset`, :func:`load_qa_jsonl`,
``Examples.to_dataset()``; needs the ``data`` extra: ``pip install 'eqloop[data]'``).
:func:`to_tensors` turns either into shifted next-token ``(inputs, targets)`` tensors, and
:func:`eval_prompts` gives the prompts and answer strings for exact-match evaluation.

With ``zero_pad=True`` (the default) every generated row has the same length, so batches
stack without padding. Generated examples are deterministic in their configuration, carry
a fingerprint derived from it and are cached on disk as one ``.npz`` file (``cache_dir``, by
default ``$EQLOOP_CACHE_DIR``, else ``$XDG_CACHE_HOME/eqloop``, else ``~/.cache/eqloop``).
Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from eqloop.data.tokenizers import CharTokenizer
from eqloop.files import jsonl_records, write_bytes_atomic
from solvers import checks

if TYPE_CHECKING:
    import datasets

__all__ = [
    "IGNORE_INDEX",
    "SEPARATOR",
    "SPLITS",
    "TASKS",
    "Examples",
    "default_cache_dir",
    "eval_prompts",
    "load_qa_jsonl",
    "make_arithmetic_dataset",
    "make_arithmetic_examples",
    "to_tensors",
]

TASKS: tuple[str, ...] = ("addition", "multiplication", "chain_addition")
SPLITS: tuple[str, ...] = ("train", "test", "ood")
IGNORE_INDEX = -100  # label of positions the loss skips (torch's cross-entropy default)
SEPARATOR = "="  # between question and answer

# Bump when the text or token layout of examples changes: it invalidates cached datasets.
_FORMAT_VERSION = 1
_COLUMNS = ("question", "answer", "input_ids", "labels", "prompt_len")
# Problem spaces up to this size are enumerated when the request is a large share of them.
_ENUMERATION_LIMIT = 1_000_000
# Candidate problems drawn per round of rejection sampling.
_DRAW_CHUNK = 4096
# Operands are drawn in blocks of at most this many decimal digits (int64-safe).
_BLOCK_DIGITS = 18
_OPERATORS = {"addition": "+", "multiplication": "*", "chain_addition": "+"}


def _datasets() -> Any:
    """The Hugging Face ``datasets`` module, or an ImportError saying how to install it."""
    try:
        import datasets
    except ModuleNotFoundError as err:
        if err.name != "datasets":
            raise
        raise ModuleNotFoundError(
            "this needs the Hugging Face datasets package: pip install 'eqloop[data]' "
            "(training and evaluation on the arithmetic tasks do not)",
            name="datasets",
        ) from None
    return datasets


@dataclass(frozen=True, eq=False)
class Examples:
    """Tokenized examples in the common form (see the module docstring), as NumPy arrays.

    Row ``i`` has the token ids ``input_ids[starts[i]:starts[i + 1]]`` and the labels at
    the same positions of ``labels``.

    Attributes:
        question: (N,) str, the problems.
        answer: (N,) str, the reference answers.
        input_ids: (T,) int32, the token ids of all rows, concatenated.
        labels: (T,) int32, ``input_ids`` with ``-100`` on every prompt.
        starts: (N + 1,) int64 row boundaries in ``input_ids`` and ``labels``.
        prompt_len: (N,) int32 prompt tokens of each row.
        fingerprint: hash of everything that decides the rows.
        description: JSON text describing where the rows come from.
        split: the split the rows belong to (None for loaded files).
    """

    question: np.ndarray
    answer: np.ndarray
    input_ids: np.ndarray
    labels: np.ndarray
    starts: np.ndarray
    prompt_len: np.ndarray
    fingerprint: str
    description: str
    split: str | None = None

    def __len__(self) -> int:
        return len(self.prompt_len)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) int64 tokens per row."""
        return np.diff(self.starts)

    def rows(self, flat: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """A (T,) array cut into rows: (N, L) if all rows have length L, else a list."""
        lengths = self.lengths
        if len(lengths) and (lengths == lengths[0]).all():
            return flat.reshape(len(lengths), int(lengths[0]))
        return np.split(flat, self.starts[1:-1])

    def columns(self) -> dict[str, list[Any]]:
        """The rows as Python lists, one list per column of the common form."""
        return {
            "question": self.question.tolist(),
            "answer": self.answer.tolist(),
            "input_ids": [row.tolist() for row in self.rows(self.input_ids)],
            "labels": [row.tolist() for row in self.rows(self.labels)],
            "prompt_len": self.prompt_len.tolist(),
        }

    def to_dataset(self) -> datasets.Dataset:
        """The same rows as an in-memory ``datasets.Dataset`` with this fingerprint.

        Needs the ``data`` extra (``pip install 'eqloop[data]'``).
        """
        hf = _datasets()
        features = hf.Features(
            {
                "question": hf.Value("string"),
                "answer": hf.Value("string"),
                "input_ids": hf.List(hf.Value("int32")),
                "labels": hf.List(hf.Value("int32")),
                "prompt_len": hf.Value("int32"),
            }
        )
        import pyarrow as pa  # a dependency of datasets
        from datasets.table import InMemoryTable

        table = InMemoryTable(pa.Table.from_pydict(self.columns(), schema=features.arrow_schema))
        info = hf.DatasetInfo(description=self.description, features=features)
        split = hf.NamedSplit(self.split) if self.split is not None else None
        return hf.Dataset(table, info=info, split=split, fingerprint=self.fingerprint)

    @classmethod
    def from_dataset(cls, dataset: Any) -> Examples:
        """The rows of a ``datasets.Dataset`` in the common form (filtered views included)."""
        table = dataset.with_format("arrow", columns=list(_COLUMNS))[:]
        ids, labels = (table[name].combine_chunks() for name in ("input_ids", "labels"))
        starts = ids.offsets.to_numpy().astype(np.int64)
        if not np.array_equal(starts, labels.offsets.to_numpy()):
            raise ValueError("input_ids and labels have different lengths in some rows")
        base = int(starts[0])
        return cls(
            question=np.array(table["question"].to_pylist(), dtype=str),
            answer=np.array(table["answer"].to_pylist(), dtype=str),
            input_ids=ids.values.to_numpy()[base : int(starts[-1])].astype(np.int32),
            labels=labels.values.to_numpy()[base : int(starts[-1])].astype(np.int32),
            starts=starts - base,
            prompt_len=table["prompt_len"].to_numpy().astype(np.int32),
            fingerprint=dataset._fingerprint,
            description=dataset.info.description or "",
            split=str(dataset.split) if dataset.split is not None else None,
        )

    def save(self, path: Path) -> None:
        """Write the rows to one ``.npz`` file, atomically."""
        buffer = io.BytesIO()
        arrays = {name: getattr(self, name) for name in (*_ARRAYS, *_TEXTS)}
        np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()}, split=self.split or "")
        write_bytes_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> Examples:
        """Rows written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            fields = {name: data[name] for name in _ARRAYS}
            texts = {name: str(data[name]) for name in _TEXTS}
            split = str(data["split"]) or None
        return cls(**fields, **texts, split=split)


_ARRAYS = ("question", "answer", "input_ids", "labels", "starts", "prompt_len")
_TEXTS = ("fingerprint", "description")


def _encode_examples(
    tokenizer: CharTokenizer,
    examples: Iterable[tuple[str, str, str]],
    *,
    fingerprint: str,
    description: str,
    split: str | None,
) -> Examples:
    """Tokenize ``(question, answer, where)`` triples into :class:`Examples`.

    ``where`` locates the example in error messages (e.g. ``"data.jsonl:12"``).

    Raises:
        ValueError: a character outside the vocabulary, reported with ``where`` and field.
    """
    questions, answers, ids, prompt_lens = [], [], [], []
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
        questions.append(question)
        answers.append(answer)
        ids.append(prompt + target)
        prompt_lens.append(len(prompt))
    starts = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(row) for row in ids], out=starts[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(starts[-1]))
    prompt_len = np.array(prompt_lens, dtype=np.int32)
    on_prompt = np.arange(len(flat)) - np.repeat(starts[:-1], np.diff(starts))
    labels = np.where(on_prompt < np.repeat(prompt_len, np.diff(starts)), IGNORE_INDEX, flat)
    return Examples(
        question=np.array(questions, dtype=str),
        answer=np.array(answers, dtype=str),
        input_ids=flat,
        labels=labels.astype(np.int32),
        starts=starts,
        prompt_len=prompt_len,
        fingerprint=fingerprint,
        description=description,
        split=split,
    )


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
    reverse_operands: bool
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
        if not self.reverse_operands:  # the format before the option existed: same hashes
            del config["reverse_operands"]
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
    """(question, answer) text of one problem, e.g. ``("0123+4567", "09640")``, or
    ``("3210+7654", "09640")`` with ``reverse_operands``."""
    width = spec.width if spec.zero_pad else 0
    answer_width = spec.answer_width if spec.zero_pad else 0
    texts = (str(x).zfill(width) for x in operands)
    if spec.reverse_operands:
        texts = (text[::-1] for text in texts)
    question = _OPERATORS[spec.task].join(texts)
    answer = str(_evaluate(spec.task, operands)).zfill(answer_width)
    return question, answer[::-1] if spec.reverse_answer else answer


def _make_spec(
    task: str,
    digits: int,
    n: int,
    seed: int,
    *,
    split: str,
    reverse_answer: bool,
    reverse_operands: bool,
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
    digits = checks.integer("digits", digits, low=1)
    n = checks.integer("n", n, low=1)
    seed = checks.integer("seed", seed, low=0)
    if task == "chain_addition":
        terms = 3 if terms is None else checks.integer("terms", terms, low=1)
        if terms < 2:
            raise ValueError(f"chain_addition needs terms >= 2, got terms={terms}")
    elif terms is not None:
        raise ValueError(f"terms applies only to task 'chain_addition', not {task!r}")
    ood_digits = (
        digits + 1 if ood_digits is None else checks.integer("ood_digits", ood_digits, low=1)
    )
    if ood_digits <= digits:
        raise ValueError(f"ood_digits must exceed digits={digits}, got ood_digits={ood_digits}")
    test_fraction = checks.number(
        "test_fraction", test_fraction, low=0, high=1, low_open=True, high_open=True
    )
    return _ArithmeticSpec(
        task=task,
        digits=digits,
        n=n,
        seed=seed,
        split=split,
        reverse_answer=checks.boolean("reverse_answer", reverse_answer),
        reverse_operands=checks.boolean("reverse_operands", reverse_operands),
        zero_pad=checks.boolean("zero_pad", zero_pad),
        terms=terms if task == "chain_addition" else 2,
        ood_digits=ood_digits,
        test_fraction=test_fraction,
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


# ---------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------


def make_arithmetic_examples(
    task: str,
    digits: int,
    n: int,
    seed: int,
    *,
    split: str = "train",
    reverse_answer: bool = True,
    reverse_operands: bool = False,
    zero_pad: bool = True,
    terms: int | None = None,
    ood_digits: int | None = None,
    test_fraction: float = 0.1,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Examples:
    """``n`` distinct arithmetic problems as :class:`Examples` in the common form.

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
        reverse_operands: write the operands least-significant digit first too. Then
            the operand digits that answer digit ``j`` adds sit at the same distance
            from it for every ``j``, so with rotary positions one attention pattern
            serves every digit (see ``experiments/plateau/run.py``).
        zero_pad: write operands with exactly ``width`` digits and the answer with the
            largest result's digit count, so all rows have one length; if False, numbers
            are written without leading zeros and rows vary in length.
        terms: operands of ``chain_addition`` (>= 2; default 3); other tasks take none.
        ood_digits: operand length of the ``ood`` split (> ``digits``).
        test_fraction: share of all problems that belongs to ``test``, in (0, 1).
        cache_dir: where examples are cached; defaults to :func:`default_cache_dir`.

    Returns:
        The rows, with token ids from the default :class:`CharTokenizer` (which every
        ``CharTokenizer`` shares). Their fingerprint is a hash of the configuration, so
        the same arguments give the same fingerprint and rows.

    Raises:
        ValueError: unknown task or split, ``digits < 1``, ``n < 1``, a bad seed, terms,
            ood_digits or test_fraction, or fewer than ``n`` distinct problems in the
            split (the message gives the number available; nothing is capped silently).
        TypeError: an argument of the wrong type (e.g. ``digits=2.5``).
    """
    spec = _make_spec(
        task,
        digits,
        n,
        seed,
        split=split,
        reverse_answer=reverse_answer,
        reverse_operands=reverse_operands,
        zero_pad=zero_pad,
        terms=terms,
        ood_digits=ood_digits,
        test_fraction=test_fraction,
    )
    fingerprint = spec.fingerprint()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "datasets" / f"{task}-d{spec.width}-{split}-n{n}-{fingerprint}.npz"
    if path.is_file():
        try:
            return Examples.load(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # rebuilt
            warnings.warn(f"rebuilding the damaged cache file {path} ({err})", stacklevel=2)
    examples = _encode_examples(
        CharTokenizer(),
        (
            (*_format_problem(spec, operands), f"problem {operands}")
            for operands in _sample_problems(spec)
        ),
        fingerprint=fingerprint,
        description=json.dumps({**asdict(spec), "format_version": _FORMAT_VERSION}),
        split=split,
    )
    examples.save(path)
    return examples


def make_arithmetic_dataset(
    task: str, digits: int, n: int, seed: int, **options: Any
) -> datasets.Dataset:
    """The rows of :func:`make_arithmetic_examples` as a Hugging Face ``datasets.Dataset``.

    Takes the same arguments; needs the ``data`` extra (``pip install 'eqloop[data]'``).

    Returns:
        An in-memory dataset with columns ``question``, ``answer``, ``input_ids``,
        ``labels``, ``prompt_len`` whose fingerprint is that of the examples.
    """
    _datasets()  # fail before generating anything when the extra is missing
    return make_arithmetic_examples(task, digits, n, seed, **options).to_dataset()


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
        ModuleNotFoundError: the ``data`` extra (``datasets``) is not installed.
        ValueError: the file holds no records, or a line is not valid JSON, not an object,
            lacks a key, has a non-text value or a character outside the tokenizer's
            vocabulary (each message gives ``path:line``).
    """
    _datasets()
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no such JSONL file: {file}")
    tokenizer = tokenizer if tokenizer is not None else CharTokenizer.printable()
    raw = file.read_bytes()
    examples = []
    for where, record in jsonl_records(file, raw):
        question = _qa_field(record, question_key, where)
        examples.append((question, _qa_field(record, answer_key, where), where))
    if not examples:
        raise ValueError(f"{file} contains no records")
    config = {
        "file": _digest(raw, size=16),
        "keys": [question_key, answer_key],
        "chars": tokenizer.chars,
        "format_version": _FORMAT_VERSION,
    }
    return _encode_examples(
        tokenizer,
        examples,
        fingerprint=_digest(json.dumps(config, sort_keys=True)),
        description=json.dumps({"source": str(file), **config}),
        split=None,
    ).to_dataset()


def _as_examples(data: Examples | datasets.Dataset) -> Examples:
    """``data`` as :class:`Examples` (a ``datasets.Dataset`` is read through Arrow)."""
    if isinstance(data, Examples):
        return data
    if hasattr(data, "with_format") and hasattr(data, "_fingerprint"):
        return Examples.from_dataset(data)
    raise TypeError(f"expected eqloop.data.Examples or a datasets.Dataset, got {type(data)}")


def to_tensors(
    data: Examples | datasets.Dataset, tokenizer: CharTokenizer, seq_len: int | None = None
) -> tuple[Tensor, Tensor]:
    """Next-token training tensors from examples in the common form.

    Row ``i`` of length ``L`` gives ``inputs[i, :L-1] = input_ids[:-1]`` and
    ``targets[i, :L-1] = labels[1:]``; the rest is ``pad_id`` / ``-100``. So
    ``cross_entropy(logits.flatten(0, 1), targets.flatten())`` (ignore index -100) is the
    loss on the answer and ``<eos>`` only.

    Args:
        data: :class:`Examples` or a ``datasets.Dataset`` with ``input_ids`` and ``labels``.
        tokenizer: supplies ``pad_id``.
        seq_len: sequence length ``S``; defaults to the longest row minus one.

    Returns:
        ``inputs`` (N, S) int64 and ``targets`` (N, S) int64.

    Raises:
        ValueError: no rows, or a row longer than ``seq_len + 1`` tokens.
    """
    examples = _as_examples(data)
    if len(examples) == 0:
        raise ValueError("the dataset is empty")
    lengths = examples.lengths - 1
    longest = int(lengths.max())
    width = longest if seq_len is None else seq_len
    if longest > width:
        raise ValueError(f"a row needs {longest} positions but seq_len={seq_len}")
    inputs = torch.full((len(lengths), width), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(lengths), width), IGNORE_INDEX, dtype=torch.long)
    ids, labels = examples.rows(examples.input_ids), examples.rows(examples.labels)
    if isinstance(ids, np.ndarray):  # equal lengths: one copy
        inputs[:, :longest] = torch.from_numpy(ids[:, :-1].astype(np.int64))
        targets[:, :longest] = torch.from_numpy(labels[:, 1:].astype(np.int64))
        return inputs, targets
    for i, (row_ids, row_labels, length) in enumerate(zip(ids, labels, lengths, strict=True)):
        inputs[i, :length] = torch.from_numpy(row_ids[:-1].astype(np.int64))
        targets[i, :length] = torch.from_numpy(row_labels[1:].astype(np.int64))
    return inputs, targets


def eval_prompts(data: Examples | datasets.Dataset) -> tuple[Tensor, list[str]]:
    """Prompts and reference answers for greedy-decoding exact-match evaluation.

    Feed ``prompts``, generate ``len(answer) + 1`` tokens greedily, and compare
    ``tokenizer.decode(generated, stop_at_eos=True)`` with the answer string.

    Args:
        data: rows in the common form, all with the same ``prompt_len`` (true for
            generated examples with ``zero_pad=True``; otherwise group rows by
            ``prompt_len`` first, e.g. with ``dataset.filter``).

    Returns:
        ``prompts`` (N, P) int64, ``<bos>`` up to and including ``=``, and the N answers.

    Raises:
        ValueError: no rows, or prompts of different lengths.
    """
    examples = _as_examples(data)
    if len(examples) == 0:
        raise ValueError("the dataset is empty")
    prompt_lens = set(examples.prompt_len.tolist())
    if len(prompt_lens) > 1:
        raise ValueError(
            f"prompts have different lengths {sorted(prompt_lens)}; evaluate one length at a "
            "time (dataset.filter on prompt_len) or generate with zero_pad=True"
        )
    (length,) = prompt_lens
    positions = examples.starts[:-1, None] + np.arange(length)
    prompts = examples.input_ids[positions]
    return torch.from_numpy(prompts.astype(np.int64)), examples.answer.tolist()
