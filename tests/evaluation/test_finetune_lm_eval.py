"""The ``eqloop`` lm-eval model class on tiny local tasks (offline, lm_eval.simple_evaluate).

Every number lm-eval reports is checked against the same quantity computed directly from
the model: loglikelihoods, greedy generations, exact match.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eqloop.data import CharTokenizer
from eqloop.data.qa import write_jsonl
from eqloop.evaluation import greedy_generate
from eqloop.models.looplm.modeling import LoopLM, LoopLMConfig
from eqloop.training.checkpoint import save_checkpoint

lm_eval = pytest.importorskip("lm_eval")
harness = pytest.importorskip("eqloop.evaluation.harness")

QA = [
    {"question": "2 + 3", "answer": "#### 5"},
    {"question": "4 + 4", "answer": "#### 8"},
    {"question": "1 + 6", "answer": "#### 7"},
]
CHOICE = [
    {"query": "1+1=", "choices": ["2", "3", "11"], "gold": 0},
    {"query": "2+2=", "choices": ["5", "4"], "gold": 1},
]
TEXT = [{"text": "a looped model loops"}, {"text": "12+34=46"}]

TASKS = {
    "tiny_qa": """task: tiny_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/qa.jsonl
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["Question:", "\\n"]
  do_sample: false
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    "tiny_choice": """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/choice.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "tiny_text": """task: tiny_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/text.jsonl
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
target_delimiter: ""
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    config = LoopLMConfig(
        vocab_size=CharTokenizer.printable().vocab_size,
        d_model=16,
        n_heads=2,
        d_ff=32,
        max_seq_len=64,
        injection="none",
        positions="rope",
        default_loops=3,
        init_std=0.2,
    )
    model = LoopLM(config).eval()
    save_checkpoint(
        root / "model",
        0,
        weights=model.state_dict(),
        config={"model": config.to_dict()},
        metrics={},
        training_state={},
    )
    write_jsonl(root / "qa.jsonl", QA)
    write_jsonl(root / "choice.jsonl", CHOICE)
    write_jsonl(root / "text.jsonl", TEXT)
    tasks = root / "tasks"
    tasks.mkdir()
    for name, text in TASKS.items():
        (tasks / f"{name}.yaml").write_text(text.format(dir=root))
    return {"root": root, "model": model, "tasks": tasks}


def _evaluate(setup: dict, tasks: list[str], model_args: str) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="eqloop",
        model_args=f"pretrained={setup['root'] / 'model'},{model_args}",
        tasks=tasks,
        task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False),
        log_samples=True,
        batch_size=2,
    )


def _logprob(model: LoopLM, context: str, continuation: str, loops: int) -> float:
    tokenizer = CharTokenizer.printable()
    ctx = tokenizer.encode(context, add_bos=True)
    whole = ctx + tokenizer.encode(continuation)
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]), loops=loops)[0]
    logprobs = F.log_softmax(logits, dim=-1)
    positions = range(len(ctx) - 1, len(whole) - 1)
    return float(sum(logprobs[p, whole[p + 1]] for p in positions))


def test_loglikelihood_and_rolling_match_the_model(setup: dict) -> None:
    model = setup["model"]
    results = {loops: _evaluate(setup, ["tiny_choice"], f"loops={loops}") for loops in (1, 3)}
    for loops, result in results.items():
        for sample in result["samples"]["tiny_choice"]:
            doc = sample["doc"]
            scores = [resp[0][0] for resp in sample["resps"]]
            expected = [_logprob(model, doc["query"], c, loops) for c in doc["choices"]]
            assert scores == pytest.approx(expected, rel=1e-5, abs=1e-5)
        accuracy = sum(
            max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) == s["doc"]["gold"]
            for s in result["samples"]["tiny_choice"]
        ) / len(CHOICE)
        assert result["results"]["tiny_choice"]["acc,none"] == pytest.approx(accuracy)
    # the loop count reaches the model
    one = results[1]["samples"]["tiny_choice"][0]["resps"][0][0][0]
    three = results[3]["samples"]["tiny_choice"][0]["resps"][0][0][0]
    assert one != pytest.approx(three)

    rolling = _evaluate(setup, ["tiny_text"], "loops=3")
    for sample in rolling["samples"]["tiny_text"]:
        text = sample["doc"]["text"]
        # one window: the prefix token predicts the text (eqloop's CharTokenizer: <bos>)
        assert sample["resps"][0][0] == pytest.approx(_logprob(model, "", text, 3), rel=1e-5)
    assert math.isfinite(rolling["results"]["tiny_text"]["word_perplexity,none"])


def test_generate_until_matches_greedy_decoding_and_exact_match(setup: dict) -> None:
    model = setup["model"]
    result = _evaluate(setup, ["tiny_qa"], "loops=2")
    tokenizer = CharTokenizer.printable()
    right = 0
    for sample in result["samples"]["tiny_qa"]:
        prompt = f"Question: {sample['doc']['question']}\nAnswer:"
        (ids,) = greedy_generate(
            lambda t: model(t, loops=2),
            [tokenizer.encode(prompt, add_bos=True)],
            max_new_tokens=6,
            eos_id=tokenizer.eos_id,
        )
        expected = tokenizer.decode(ids).split("Question:")[0].split("\n")[0]
        assert sample["resps"][0][0] == expected
        right += expected.strip() == sample["doc"]["answer"]
    assert result["results"]["tiny_qa"]["exact_match,none"] == pytest.approx(right / len(QA))
    assert result["config"]["model_args"].endswith("loops=2")


def test_bad_model_args_are_named(setup: dict) -> None:
    directory = setup["root"] / "model"
    with pytest.raises(ValueError, match=r"unknown eqloop model_args \['loop'\]"):
        harness.EqloopLM(pretrained=str(directory), loop=3)
    with pytest.raises(ValueError, match="loops and solver are exclusive"):
        harness.EqloopLM(pretrained=str(directory), loops=3, solver="anderson")
    at_eq = harness.EqloopLM(pretrained=str(directory), solver="anderson", max_iter=20)
    assert at_eq.get_model_info() == {"loops": None, "solver": "anderson"}


@pytest.mark.slow
def test_command_line_route(setup: dict, tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "eqloop.evaluation.harness",
        "--model",
        "eqloop",
        "--model_args",
        f"pretrained={setup['root'] / 'model'},loops=2",
        "--tasks",
        "tiny_qa",
        "--include_path",
        str(setup["tasks"]),
        "--output_path",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    assert "exact_match,none" in json.loads(result_file.read_text())["results"]["tiny_qa"]


# ------------------------------------------------ row 21: determinism and clear refusals


@pytest.fixture(scope="module")
def huginn(tmp_path_factory: pytest.TempPathFactory):
    from eqloop import pretrained

    return pretrained.write_tiny_checkpoint(tmp_path_factory.mktemp("huginn") / "m", "huginn_raven")


def _requests(lm) -> list:
    texts = [("Hello", " there"), ("1+1=", "2"), ("a looped model", " loops again")]
    return [
        ((ctx, cont), lm.tok_encode(ctx), lm.tok_encode(cont, add_special_tokens=False))
        for ctx, cont in texts
    ]


def test_huginn_loglikelihoods_do_not_depend_on_the_batch(huginn) -> None:
    scores = {}
    for batch_size in (1, 3):
        lm = harness.EqloopLM(pretrained=str(huginn), batch_size=batch_size)
        scores[batch_size] = [score for score, _ in lm._loglikelihood_tokens(_requests(lm))]
        again = [score for score, _ in lm._loglikelihood_tokens(_requests(lm)[::-1])][::-1]
        assert again == scores[batch_size]
    assert scores[1] == pytest.approx(scores[3], rel=1e-5, abs=1e-5)
    assert lm.get_model_info()["init_scale"] == 0.0
    # upstream's random start, drawn from the seed for every forward pass: reproducible
    random = harness.EqloopLM(pretrained=str(huginn), batch_size=1, init_scale=1.0, seed=3)
    first = [score for score, _ in random._loglikelihood_tokens(_requests(random))]
    assert [s for s, _ in random._loglikelihood_tokens(_requests(random))] == first
    assert first != pytest.approx(scores[1], rel=1e-5, abs=1e-5)  # the scale reaches the model
    with pytest.raises(ValueError, match=r"init_scale=1.0 draws a random start .* batch_size=1"):
        harness.EqloopLM(pretrained=str(huginn), batch_size=2, init_scale=1.0)


def test_huginn_generations_do_not_depend_on_the_batch(huginn) -> None:
    from lm_eval.api.instance import Instance

    prompts = ["Hello", "1+1=", "a looped model", "Hello"]
    requests = [
        Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 5}), i)
        for i, p in enumerate(prompts)
    ]
    texts = {}
    for batch_size, init_scale in ((1, None), (4, None), (1, 1.0)):
        lm = harness.EqloopLM(pretrained=str(huginn), batch_size=batch_size, init_scale=init_scale)
        texts[batch_size, init_scale] = lm.generate_until(requests, disable_tqdm=True)
        assert lm.generate_until(requests, disable_tqdm=True) == texts[batch_size, init_scale]
    assert texts[1, None] == texts[4, None]
    assert texts[1, None][0] == texts[1, None][3] and texts[1, 1.0][0] == texts[1, 1.0][3]


def test_bad_lm_eval_settings_are_refused_clearly(setup: dict, huginn) -> None:
    from lm_eval.api.instance import Instance

    directory = str(setup["root"] / "model")
    with pytest.raises(ValueError, match=r"unknown solver 'newton'; available: .*anderson"):
        harness.EqloopLM(pretrained=directory, solver="newton")
    with pytest.raises(ValueError, match="init_scale is a Huginn option"):
        harness.EqloopLM(pretrained=directory, init_scale=1.0)
    with pytest.warns(UserWarning, match="does not probe the memory; it runs 4 sequences"):
        assert (
            harness.EqloopLM(pretrained=directory, batch_size="auto:4", max_batch_size=4).batch_size
            == 4
        )
    with pytest.warns(UserWarning, match="it runs 8 sequences"):
        assert harness.EqloopLM(pretrained=directory, batch_size="auto").batch_size == 8
    assert harness.EqloopLM(pretrained=directory, batch_size="2").batch_size == 2
    for bad in ("auto:x", "big", "auto4"):
        with pytest.raises(ValueError, match="batch_size must be an integer, auto or auto:N"):
            harness.EqloopLM(pretrained=directory, batch_size=bad)

    lm = harness.EqloopLM(pretrained=directory, max_length=8)
    request = Instance("generate_until", {}, ("Question: 2 + 3\nAnswer:", {"max_gen_toks": 8}), 0)
    with pytest.raises(ValueError, match="max_gen_toks 8 leaves no room for the prompt in max_le"):
        lm.generate_until([request])

    def request_of(continuation: str) -> list:
        ids = lm.tok_encode(continuation, add_special_tokens=False)
        return [(("1", continuation), lm.tok_encode("1"), ids)]

    with pytest.raises(ValueError, match="continuation of 9 tokens .* does not fit max_length 8"):
        lm._loglikelihood_tokens(request_of("234567890"))
    # the longest that fits: the context is cut to its last token, as lm-eval's HF model does
    assert math.isfinite(lm._loglikelihood_tokens(request_of("23456789"))[0][0])
