"""Tests of eqloop.data: tokenizer, arithmetic datasets, splits, caching, JSONL loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import eqloop
from eqloop.data import (
    ARITHMETIC_CHARS,
    IGNORE_INDEX,
    TASKS,
    CharTokenizer,
    eval_prompts,
    load_qa_jsonl,
    make_arithmetic_dataset,
    make_arithmetic_examples,
    to_tensors,
)

COLUMNS = ["question", "answer", "input_ids", "labels", "prompt_len"]


def _operands(question: str) -> list[int]:
    return [int(x) for x in question.replace("*", "+").split("+")]


def _result(task: str, question: str) -> int:
    operands = _operands(question)
    return math.prod(operands) if task == "multiplication" else sum(operands)


# -- tokenizer ---------------------------------------------------------------------------


def test_public_exports() -> None:
    assert eqloop.CharTokenizer is CharTokenizer
    assert eqloop.make_arithmetic_dataset is make_arithmetic_dataset
    assert eqloop.load_qa_jsonl is load_qa_jsonl


def test_every_tokenizer_lives_in_one_module() -> None:
    from eqloop import pretrained
    from eqloop.data import tokenizers
    from eqloop.recipes import finetune

    assert pretrained.load_tokenizer is tokenizers.load_tokenizer
    assert finetune.as_text_tokenizer is tokenizers.as_text_tokenizer
    assert CharTokenizer is tokenizers.CharTokenizer


def _tiny_checkpoint(path: Path) -> Path:
    pytest.importorskip("transformers")
    from eqloop import pretrained

    return pretrained.write_tiny_checkpoint(path, "ouro")


def test_tokenizer_config_that_is_no_object_is_an_error_naming_it(tmp_path: Path) -> None:
    from eqloop.data import load_tokenizer

    path = _tiny_checkpoint(tmp_path / "ouro")
    assert load_tokenizer(path).pad_token_id == 0
    (path / "tokenizer_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"tokenizer_config.json must hold a JSON object"):
        load_tokenizer(path)


def test_pad_token_defaults_to_eos(tmp_path: Path) -> None:
    from eqloop.data import SpecialTokenWarning, load_tokenizer

    path = _tiny_checkpoint(tmp_path / "ouro")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((path / name).read_text())
        del data["pad_token"]
        (path / name).write_text(json.dumps(data))
    with pytest.warns(SpecialTokenWarning, match=r"config.json pad_token_id=0 \(tokenizer: 2\)"):
        tokenizer = load_tokenizer(path)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2


def test_prompts_of_a_directory_without_tokenizer_are_bytes_with_a_warning(
    tmp_path: Path,
) -> None:
    from eqloop import pretrained
    from eqloop.data import encode_prompts

    path = _tiny_checkpoint(tmp_path / "ouro")
    with_tokenizer = encode_prompts(path, ["ab", "abcd"], 100)
    assert with_tokenizer[1].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink()
    with pytest.warns(UserWarning, match=r"has no tokenizer.json: .* UTF-8 bytes modulo .* \(7\)"):
        ids, mask = encode_prompts(path, ["a", "\u00e9b"], 7)
    assert ids.tolist() == [[0, 0, 97 % 7], [0xC3 % 7, 0xA9 % 7, 98 % 7]]
    assert mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    # What `eqloop eval --pretrained DIR` runs on a weights-only directory: said, not silent.
    with pytest.warns(UserWarning, match="has no tokenizer.json"):
        pretrained.diagnose_checkpoint(path, prompts=["hi"], loops=1, rho=False)


def test_tokenizer_round_trip_and_specials() -> None:
    tok = CharTokenizer()
    text = "0123+4567*89=, -"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == len(text) + 2
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False) == f"<bos>{text}<eos>"
    assert tok.decode(torch.tensor([*tok.encode("12"), tok.eos_id, 5]), stop_at_eos=True) == "12"
    assert tok.vocab_size == len(tok.vocab) == 3 + len(ARITHMETIC_CHARS)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert len(set(tok.vocab)) == tok.vocab_size


def test_larger_vocabularies_keep_the_arithmetic_ids() -> None:
    base, text = CharTokenizer(), CharTokenizer.printable()
    assert text.encode("0123+4567=") == base.encode("0123+4567=")
    sentence = "Natalia sold 48/2 = 24 clips.\nTotal: 72!"
    assert text.decode(text.encode(sentence)) == sentence
    assert CharTokenizer(extra_chars="ab") == CharTokenizer(extra_chars="ab")


def test_tokenizer_errors_name_the_character() -> None:
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=r"character 'x' \(U\+0078\) at position 2"):
        tok.encode("12x4")
    with pytest.raises(ValueError, match="token id 99 is outside"):
        tok.decode([3, 99])
    with pytest.raises(ValueError, match="repeats characters"):
        CharTokenizer(extra_chars="a5")


# -- arithmetic datasets -----------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_correct_and_rows_fixed_length(task: str, tmp_path: Path) -> None:
    ds = make_arithmetic_dataset(task, 3, 200, seed=0, cache_dir=tmp_path)
    assert ds.column_names == COLUMNS and len(ds) == 200
    tok = CharTokenizer()
    terms = 3 if task == "chain_addition" else 2
    for row in ds:
        operands = row["question"].replace("*", "+").split("+")
        assert len(operands) == terms and all(len(x) == 3 for x in operands)
        assert int(row["answer"][::-1]) == _result(task, row["question"])
        prompt = f"{row['question']}="
        assert row["input_ids"] == tok.encode(prompt + row["answer"], add_bos=True, add_eos=True)
        assert row["prompt_len"] == len(prompt) + 1
        assert row["labels"][: row["prompt_len"]] == [IGNORE_INDEX] * row["prompt_len"]
        assert row["labels"][row["prompt_len"] :] == row["input_ids"][row["prompt_len"] :]
    assert len({len(ids) for ids in ds["input_ids"]}) == 1  # batches stack without padding
    assert len(set(ds["question"])) == 200  # distinct problems


def test_answer_reversal_and_padding(tmp_path: Path) -> None:
    kwargs = {"task": "addition", "digits": 4, "n": 50, "seed": 3, "cache_dir": tmp_path}
    reversed_ds = make_arithmetic_dataset(**kwargs, reverse_answer=True)
    plain_ds = make_arithmetic_dataset(**kwargs, reverse_answer=False)
    assert reversed_ds["question"] == plain_ds["question"]  # format does not change problems
    for rev, plain, question in zip(
        reversed_ds["answer"], plain_ds["answer"], plain_ds["question"], strict=True
    ):
        assert rev == plain[::-1] and len(plain) == 5  # 4 + 4 digits -> up to 5
        assert int(plain) == _result("addition", question)
    natural = make_arithmetic_dataset(**kwargs, zero_pad=False, reverse_answer=False)
    for row in natural:
        assert row["answer"] == str(_result("addition", row["question"]))
        assert all(x == str(int(x)) for x in row["question"].split("+"))


def test_operand_reversal_writes_the_same_problems_least_significant_digit_first(
    tmp_path: Path,
) -> None:
    kwargs = {"task": "addition", "digits": 4, "n": 50, "seed": 3, "cache_dir": tmp_path}
    plain = make_arithmetic_dataset(**kwargs)
    flipped = make_arithmetic_dataset(**kwargs, reverse_operands=True)
    assert flipped["answer"] == plain["answer"]  # same problems, same answer format
    for rev, question in zip(flipped["question"], plain["question"], strict=True):
        assert rev.split("+") == [operand[::-1] for operand in question.split("+")]
    assert flipped._fingerprint != plain._fingerprint  # cached apart
    assert len(list((tmp_path / "datasets").iterdir())) == 2
    with pytest.raises(TypeError, match="reverse_operands must be true or false"):
        make_arithmetic_examples(**kwargs, reverse_operands="yes")


def test_a_train_config_passes_the_operand_order_to_its_data(tmp_path: Path) -> None:
    from eqloop.training.config import TrainConfig

    settings = {"digits": 2, "n_train": 64, "n_test": 8, "data_cache_dir": str(tmp_path)}
    plain = TrainConfig.from_dict(settings).make_examples("test").columns()["question"]
    config = TrainConfig.from_dict({**settings, "reverse_operands": True})
    flipped = config.make_examples("test").columns()["question"]
    assert flipped == ["+".join(x[::-1] for x in q.split("+")) for q in plain]
    with pytest.raises(TypeError, match="reverse_operands"):
        TrainConfig.from_dict({**settings, "reverse_operands": 1})


def test_same_config_same_fingerprint_and_rows(tmp_path: Path) -> None:
    first = make_arithmetic_dataset("addition", 4, 300, seed=1, cache_dir=tmp_path / "a")
    second = make_arithmetic_dataset("addition", 4, 300, seed=1, cache_dir=tmp_path / "b")
    cached = make_arithmetic_dataset("addition", 4, 300, seed=1, cache_dir=tmp_path / "a")
    assert first._fingerprint == second._fingerprint == cached._fingerprint
    assert first.to_dict() == second.to_dict() == cached.to_dict()
    assert len(list((tmp_path / "a" / "datasets").iterdir())) == 1  # written once, reused


def test_default_cache_dir_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EQLOOP_CACHE_DIR", str(tmp_path / "env-cache"))
    ds = make_arithmetic_dataset("addition", 2, 10, seed=0)
    (entry,) = (tmp_path / "env-cache" / "datasets").iterdir()
    assert entry.name.startswith("addition-d2-train-n10-") and ds._fingerprint in entry.name


def test_different_config_different_rows(tmp_path: Path) -> None:
    base = make_arithmetic_dataset("addition", 4, 100, seed=1, cache_dir=tmp_path)
    other_seed = make_arithmetic_dataset("addition", 4, 100, seed=2, cache_dir=tmp_path)
    other_task = make_arithmetic_dataset("multiplication", 4, 100, seed=1, cache_dir=tmp_path)
    assert base._fingerprint != other_seed._fingerprint != other_task._fingerprint
    assert base["question"] != other_seed["question"]
    assert len(set(base["question"]) & set(other_seed["question"])) < 5


def test_train_and_test_are_disjoint_across_seeds(tmp_path: Path) -> None:
    train = make_arithmetic_dataset("addition", 2, 2000, seed=0, cache_dir=tmp_path)
    test = make_arithmetic_dataset("addition", 2, 300, seed=5, split="test", cache_dir=tmp_path)

    def problems(ds: object) -> set[tuple[int, ...]]:
        return {tuple(sorted(_operands(q))) for q in ds["question"]}  # type: ignore[index]

    assert not problems(train) & problems(test)  # not even commuted copies
    assert test.split == "test" and train.split == "train"


def test_ood_split_has_longer_numbers(tmp_path: Path) -> None:
    ood = make_arithmetic_dataset("addition", 3, 100, seed=0, split="ood", cache_dir=tmp_path)
    for row in ood:
        operands = row["question"].split("+")
        assert all(len(x) == 4 for x in operands)
        assert max(int(x) for x in operands) >= 1000
        assert int(row["answer"][::-1]) == _result("addition", row["question"])
    wider = make_arithmetic_dataset(
        "chain_addition", 2, 20, seed=0, split="ood", ood_digits=5, terms=4, cache_dir=tmp_path
    )
    assert all(len(x) == 5 for q in wider["question"] for x in q.split("+"))


def test_small_problem_space_is_enumerated_or_refused(tmp_path: Path) -> None:
    # 1-digit addition has 100 ordered problems; the hash sends some of them to test.
    train = make_arithmetic_dataset("addition", 1, 60, seed=0, cache_dir=tmp_path)
    assert len(set(train["question"])) == 60
    with pytest.raises(ValueError, match=r"only \d+ distinct addition problems .* n=100"):
        make_arithmetic_dataset("addition", 1, 100, seed=0, cache_dir=tmp_path)


def test_large_digit_counts_are_exact(tmp_path: Path) -> None:
    ds = make_arithmetic_dataset("multiplication", 25, 20, seed=0, cache_dir=tmp_path)
    for row in ds:
        assert int(row["answer"][::-1]) == _result("multiplication", row["question"])
        assert len(row["answer"]) == 50


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "subtraction"}, r"unknown task 'subtraction'; valid tasks: \['addition'"),
        ({"digits": 0}, "digits must be an integer >= 1, got 0"),
        ({"n": 0}, "n must be an integer >= 1, got 0"),
        ({"split": "validation"}, r"unknown split 'validation'; valid splits"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"terms": 3}, "terms applies only to task 'chain_addition'"),
        ({"task": "chain_addition", "terms": 1}, "terms >= 2"),
        ({"ood_digits": 2}, "ood_digits must exceed digits=2"),
        ({"test_fraction": 1.0}, "test_fraction must be a number > 0 and < 1, got 1.0"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str, tmp_path: Path) -> None:
    args = {"task": "addition", "digits": 2, "n": 10, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_arithmetic_examples(**args, cache_dir=tmp_path)
    assert not tmp_path.joinpath("datasets").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"digits": 2.5}, "digits must be an integer, got float 2.5"),
        ({"seed": True}, "seed must be an integer, got the bool True"),
        ({"zero_pad": "no"}, "zero_pad must be true or false"),
    ],
)
def test_arguments_of_the_wrong_type_raise_type_error(
    kwargs: dict, message: str, tmp_path: Path
) -> None:
    args = {"task": "addition", "digits": 2, "n": 10, "seed": 0, **kwargs}
    with pytest.raises(TypeError, match=message):
        make_arithmetic_examples(**args, cache_dir=tmp_path)


def test_examples_and_dataset_hold_the_same_rows(tmp_path: Path) -> None:
    examples = make_arithmetic_examples("addition", 3, 50, seed=4, cache_dir=tmp_path)
    dataset = make_arithmetic_dataset("addition", 3, 50, seed=4, cache_dir=tmp_path)
    assert dataset._fingerprint == examples.fingerprint and len(dataset) == len(examples)
    assert examples.columns() == dataset.to_dict()
    for data in (examples, dataset):
        inputs, targets = to_tensors(data, CharTokenizer())
        prompts, answers = eval_prompts(data)
        # <bos> 3 digits + 3 digits = 4 answer digits <eos>, minus the shift: 13 positions
        assert answers == list(dataset["answer"]) and inputs.shape == (50, 13)
    assert torch.equal(to_tensors(examples, CharTokenizer())[1], targets)
    # A filtered view of a dataset is read through its indices, not the whole table.
    odd = dataset.select(range(1, 50, 2))
    assert eval_prompts(odd)[1] == answers[1::2]
    assert torch.equal(to_tensors(odd, CharTokenizer())[0], inputs[1::2])


def test_damaged_cache_file_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    first = make_arithmetic_examples("addition", 2, 20, seed=0, cache_dir=tmp_path)
    (entry,) = (tmp_path / "datasets").iterdir()
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(UserWarning, match="rebuilding the damaged cache file"):
        again = make_arithmetic_examples("addition", 2, 20, seed=0, cache_dir=tmp_path)
    assert again.columns() == first.columns()
    assert make_arithmetic_examples("addition", 2, 20, seed=0, cache_dir=tmp_path).columns() == (
        first.columns()
    )


# -- tensors for training and evaluation -------------------------------------------------


def test_to_tensors_shifts_and_masks(tmp_path: Path) -> None:
    tok = CharTokenizer()
    ds = make_arithmetic_dataset("addition", 4, 8, seed=0, cache_dir=tmp_path)
    inputs, targets = to_tensors(ds, tok)
    length = len(ds[0]["input_ids"])
    assert inputs.shape == targets.shape == (8, length - 1)
    assert inputs.dtype == targets.dtype == torch.long
    row = ds[0]
    assert inputs[0].tolist() == row["input_ids"][:-1]
    assert targets[0].tolist() == row["labels"][1:]
    answer_positions = targets[0] != IGNORE_INDEX
    assert tok.decode(targets[0][answer_positions]) == row["answer"]  # answer + <eos>
    padded_inputs, padded_targets = to_tensors(ds, tok, seq_len=20)
    assert padded_inputs.shape == (8, 20)
    assert (padded_inputs[:, length - 1 :] == tok.pad_id).all()
    assert (padded_targets[:, length - 1 :] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="seq_len=5"):
        to_tensors(ds, tok, seq_len=5)


def test_to_tensors_pads_ragged_rows(tmp_path: Path) -> None:
    tok = CharTokenizer()
    ds = make_arithmetic_dataset("addition", 3, 40, seed=0, zero_pad=False, cache_dir=tmp_path)
    inputs, targets = to_tensors(ds, tok)
    lengths = [len(ids) - 1 for ids in ds["input_ids"]]
    assert len(set(lengths)) > 1 and inputs.shape == (40, max(lengths))
    for i, length in enumerate(lengths):
        assert inputs[i, :length].tolist() == ds[i]["input_ids"][:-1]
        assert (inputs[i, length:] == tok.pad_id).all()
        assert (targets[i, length:] == IGNORE_INDEX).all()


def test_eval_prompts_end_at_the_separator(tmp_path: Path) -> None:
    tok = CharTokenizer()
    ds = make_arithmetic_dataset("addition", 4, 16, seed=0, cache_dir=tmp_path)
    prompts, answers = eval_prompts(ds)
    assert prompts.shape == (16, 11) and prompts.dtype == torch.long
    assert answers == ds["answer"]
    assert tok.decode(prompts[0]) == ds[0]["question"] + "="
    # A perfect model would generate exactly the stored continuation.
    generated = torch.tensor(ds[0]["input_ids"][11:] + [tok.pad_id])
    assert tok.decode(generated, stop_at_eos=True) == answers[0]
    ragged = make_arithmetic_dataset("addition", 4, 50, seed=0, zero_pad=False, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="prompts have different lengths"):
        eval_prompts(ragged)


# -- local JSONL files -------------------------------------------------------------------


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_qa_jsonl(tmp_path: Path) -> None:
    records = [
        {"question": "Natalia sold 48 clips. How many?", "answer": "48/2 = 24\n#### 72"},
        {"question": "What is 2+3?", "answer": 5},
    ]
    path = _write_lines(tmp_path / "qa.jsonl", [json.dumps(r) for r in records] + [""])
    ds = load_qa_jsonl(path)
    assert ds.column_names == COLUMNS and len(ds) == 2
    assert ds["answer"] == ["48/2 = 24\n#### 72", "5"]
    tok = CharTokenizer.printable()
    row = ds[1]
    assert row["input_ids"] == tok.encode("What is 2+3?=5", add_bos=True, add_eos=True)
    assert row["prompt_len"] == len("What is 2+3?=") + 1
    inputs, targets = to_tensors(ds, tok)
    assert inputs.shape[0] == 2
    assert tok.decode(targets[1][targets[1] != IGNORE_INDEX]) == "5"
    assert load_qa_jsonl(path)._fingerprint == ds._fingerprint


def test_load_qa_jsonl_custom_keys(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "qa.jsonl", [json.dumps({"q": "1+1", "a": "2", "id": 7})])
    ds = load_qa_jsonl(path, question_key="q", answer_key="a", tokenizer=CharTokenizer())
    assert ds[0]["question"] == "1+1" and ds[0]["answer"] == "2"


_GOOD = '{"question": "a", "answer": "b"}'


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([_GOOD, '{"question": "c", "answer": '], r"qa.jsonl:2: invalid JSON"),
        ([_GOOD, "", "[1, 2]"], r"qa.jsonl:3: expected a JSON object"),
        (['{"question": "a"}'], r":1: missing key 'answer' \(keys present: \['question'\]\)"),
        (['{"question": "a", "answer": null}'], r":1: 'answer' must be a string or number"),
        (['{"question": "caf\\u00e9", "answer": "b"}'], r":1: question: character 'é'"),
        (["", "   "], "contains no records"),
    ],
)
def test_load_qa_jsonl_malformed(lines: list[str], message: str, tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "qa.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        load_qa_jsonl(path)


def test_load_qa_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such JSONL file"):
        load_qa_jsonl(tmp_path / "absent.jsonl")
