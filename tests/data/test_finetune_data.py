"""Fine-tuning data: JSONL formats and their errors, template, answers, word problems."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from eqloop.data import CharTokenizer
from eqloop.data.problems import KINDS, make_problems, make_splits
from eqloop.data.qa import (
    Example,
    PromptTemplate,
    encode_examples,
    extract_answer,
    load_jsonl,
    write_jsonl,
)
from eqloop.data.tokenizers import as_text_tokenizer

GSM8K_LINE = {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_gsm8k_and_prompt_completion_files_load(tmp_path: Path) -> None:
    gsm = write_jsonl(tmp_path / "g.jsonl", [GSM8K_LINE, {**GSM8K_LINE, "answer": "#### 1,250"}])
    examples = load_jsonl(gsm)
    assert [e.answer for e in examples] == ["7", "1250"]
    assert examples[1].where == f"{gsm}:2"
    pc = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    (example,) = load_jsonl(pc)
    assert example.raw_prompt and example.answer == "4"
    template = PromptTemplate()
    assert template.format_prompt(example) == "2+2="
    assert template.format_prompt(examples[0]) == f"Question: {GSM8K_LINE['question']}\nAnswer:"
    assert template.format_completion(examples[0]) == " " + GSM8K_LINE["answer"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([json.dumps(GSM8K_LINE), json.dumps({"question": "q"})], r":2: missing key 'answer'"),
        (
            [json.dumps(GSM8K_LINE), "", json.dumps({"question": "q", "answer": "no mark 5"})],
            r":3: the answer has no final '#### <number>'",
        ),
        ([json.dumps(GSM8K_LINE), '{"question": "q", "answer"'], r":2: invalid JSON"),
        (["[1, 2]"], r":1: expected a JSON object"),
        ([json.dumps({"question": 5, "answer": ["x"]})], r":1: 'answer' must be a string"),
        (["", "  "], r": the file holds no records"),
        ([json.dumps({"text": "x"})], r":1: cannot tell the format"),
        (
            [json.dumps({"prompt": "a", "completion": "b"}), json.dumps({"prompt": "c"})],
            r":2: missing key 'completion'",
        ),
        # row 22: an empty prompt, and a final answer that is not a whole number
        ([json.dumps({"prompt": "", "completion": "4"})], r":1: 'prompt' is empty"),
        ([json.dumps({"question": " ", "answer": "#### 4"})], r":1: 'question' is empty"),
        (
            [json.dumps({"question": "q", "answer": "#### 1e5"})],
            r":1: the final answer after '####' must be a number .*, got '1e5'",
        ),
        (
            [json.dumps(GSM8K_LINE), json.dumps({"question": "q", "answer": "#### 3/4"})],
            r":2: the final answer after '####' must be a number .*, got '3/4'",
        ),
    ],
)
def test_jsonl_errors_name_the_file_and_line(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=re.escape(str(path)) + message):
        load_jsonl(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"{empty}: the file holds no records"):
        load_jsonl(empty)
    with pytest.raises(FileNotFoundError, match="no such JSONL file"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="format must be one of"):
        load_jsonl(empty, format="csv")


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so the total is 5 + 6 = 11.\n#### 11", "11"),
        ("#### $1,234.50", "1234.5"),
        ("#### -3", "-3"),
        ("She pays $12.00 in all.", "12"),
        ("first 3, then 4, finally 19 apples", "19"),
        ("#### 7 but later 9", "7"),
        ("no digits here", None),
        # row 22: the whole number after the mark, or no answer (never a prefix of it)
        ("#### 72.", "72"),
        ("####\n1,000 apples", "1000"),
        ("#### 1e5", None),
        ("#### 3/4", None),
        ("it is 3/4", None),
        ("about 1e5 or 2.5e3", None),
        ("x=5, so 3.5.", "3.5"),
        ("#### 18) and more", "18"),
        ("#### 1,5e3", None),
    ],
)
def test_answer_extraction(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer


def test_an_example_without_a_prompt_is_refused_before_encoding() -> None:
    # row 22: a tokenizer without a beginning-of-sequence token (Ouro, Huginn) encodes an
    # empty prompt to no token at all, which was a raw RuntimeError in encode_examples
    with pytest.raises(ValueError, match=r"d.jsonl:3: 'prompt' is empty; every example needs"):
        Example("", "4", "4", where="d.jsonl:3", raw_prompt=True)
    with pytest.raises(ValueError, match=r"an example: 'question' is empty"):
        Example("\n", "#### 4", "4")


def test_prompt_template_checks_its_field() -> None:
    with pytest.raises(ValueError, match=r"\{question\}"):
        PromptTemplate("Q: {q}")
    assert PromptTemplate("Q: {question} {{literal}}").prompt


def test_encoded_targets_cover_the_completion_only(tmp_path: Path) -> None:
    tokenizer = as_text_tokenizer(CharTokenizer.printable())
    examples = load_jsonl(
        write_jsonl(tmp_path / "g.jsonl", [GSM8K_LINE, {**GSM8K_LINE, "answer": "#### 2"}])
    )
    inputs, targets = encode_examples(examples, tokenizer, max_len=200)
    assert inputs.shape == targets.shape
    for row, example in enumerate(examples):
        scored = targets[row][targets[row] >= 0].tolist()
        assert scored[-1] == tokenizer.eos_id
        assert tokenizer.decode(scored[:-1]) == " " + example.completion
        # next-token shift: the input at the first scored position is the prompt's last token
        first = int((targets[row] >= 0).nonzero()[0])
        prompt = tokenizer.encode_prompt(PromptTemplate().format_prompt(example))
        assert inputs[row, : first + 1].tolist() == prompt
    assert int(inputs[1, -1]) == tokenizer.pad_id  # the shorter row is right-padded
    with pytest.raises(ValueError, match=r"g.jsonl:1: \d+ tokens do not fit max_len=10"):
        encode_examples(examples, tokenizer, max_len=10)


def _check_arithmetic(answer: str) -> int:
    """Every <<expr=value>> annotation is right and the last value is the final answer."""
    values = []
    for expr, value in re.findall(r"<<([^=]+)=(-?\d+)>>", answer):
        a, op, b = re.fullmatch(r"(\d+)([-+*/])(\d+)", expr).groups()
        result = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}.get(op)
        if op == "/":
            assert int(a) % int(b) == 0
            result = int(a) // int(b)
        assert result == int(value), answer
        values.append(result)
    final = int(answer.rsplit("#### ", 1)[1])
    assert values and values[-1] == final
    return final


def test_word_problems_are_deterministic_correct_and_split_disjointly(tmp_path: Path) -> None:
    problems = make_problems(300, seed=3)
    assert problems == make_problems(300, seed=3)
    assert problems != make_problems(300, seed=4)
    assert len({p["question"] for p in problems}) == 300
    for problem in problems:
        assert _check_arithmetic(problem["answer"]) >= 0
        assert problem["question"].isascii() and problem["answer"].isascii()
    kinds = {
        "add": "buys",
        "subtract": "gave",
        "multiply": "boxes",
        "divide": "shares",
        "buy_packs": "packs",
        "wage": "earns",
    }
    assert set(kinds) == set(KINDS)
    assert all(any(word in p["question"] for p in problems) for word in kinds.values())
    train, test = make_splits(200, 50, seed=1, kinds=("add", "wage"))
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    # they load as a GSM8K file with the generated answers
    examples = load_jsonl(write_jsonl(tmp_path / "w.jsonl", test))
    assert [e.answer for e in examples] == [p["answer"].rsplit(" ", 1)[1] for p in test]
    with pytest.raises(ValueError, match="could not draw"):
        make_problems(100, seed=0, max_value=4, kinds=("divide",))  # 80 distinct
    with pytest.raises(ValueError, match="kind must be one of"):
        make_problems(5, seed=0, kinds=("algebra",))


def test_tokenizer_wrappers_agree_on_special_ids() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<pad>": 1, "a": 2, "b": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = as_text_tokenizer(raw)
    assert (wrapped.eos_id, wrapped.pad_id, wrapped.bos_id) == (0, 1, None)
    assert wrapped.encode("a b") == [2, 3] and wrapped.vocab_size == 4
    char = as_text_tokenizer(CharTokenizer())
    assert char.encode_prompt("1+2=") == [1, *CharTokenizer().encode("1+2=")]
    with pytest.raises(TypeError, match="tokenizer must be"):
        as_text_tokenizer(object())
    assert torch.is_tensor(torch.tensor(char.encode("12")))
