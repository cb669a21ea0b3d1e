"""The README, docs/*.md and experiments/*/README.md: every Python block runs as written,
every command shown exists, every link resolves.

Each file's ```python blocks run in order, in one namespace per file, exactly as a reader
would paste them; all files run in one fresh directory (the README first), so no page
writes over another page's files. The
commands of the ```bash blocks are not run; each ``eqloop``, ``eqloop-lm-eval``,
``benchmarks/*.py`` and ``experiments/*/run.py`` command must exist and every ``--flag``
it shows must be in its ``--help``. Every experiment is a folder with its script, its
README and its results.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md"))]
EXPERIMENTS = sorted(script.parent for script in (ROOT / "experiments").glob("*/run.py"))
# The experiments' READMEs: their commands and links are checked like the docs pages'.
EXPERIMENT_READMES = [path / "README.md" for path in EXPERIMENTS]

# What running a file's blocks must leave behind (relative to its directory), beyond
# running without an error: the files the snippets say they write.
WRITES = {
    "README.md": ["runs/tour/config.json"],
    "training.md": ["runs/docs-train/metrics.jsonl"],
    "evaluation.md": ["runs/docs-eval/metrics.jsonl"],
    "pretrained.md": [
        "toy-ouro/config.json",
        "toy-diag.json",
        "toy-diag.png",
        "toy-ouro-saved/config.json",
    ],
    "finetune.md": ["runs/toy-stars/model/config.json", "runs/toy-stars/eval.json"],
}


def fenced_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """The ```language blocks of a Markdown file: (line of the fence, code)."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if current is None and line.strip() == f"```{language}":
            current, start = [], number
        elif current is not None and line.strip() == "```":
            blocks.append((start, "\n".join(current) + "\n"))
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, f"{path.name}:{start}: a ```{language} block is never closed"
    return blocks


def test_readme_is_a_front_door_that_ci_can_read() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) <= 12 * 1024, "README.md must stay within 12 KB"
    # .ci/run reads these two lines; they must not change.
    lines = text.splitlines()
    assert 'pip install torch==2.13.0 && pip install -e ".[all]"   # setup' in lines
    assert "python -m pytest -n 2                                     # tests" in lines
    for page in DOC_FILES[1:]:
        assert f"docs/{page.name}" in text, f"the README does not link docs/{page.name}"
    for reference in (
        "arxiv.org/abs/2605.26733",
        "arxiv.org/abs/2510.25741",
        "arxiv.org/abs/2502.05171",
    ):
        assert reference in text


def test_every_doc_page_has_python_or_shell_examples() -> None:
    assert len(DOC_FILES) >= 8
    for path in DOC_FILES:
        if path.name != "index.md":
            assert fenced_blocks(path, "python") or fenced_blocks(path, "bash"), path.name


def test_the_pretrained_page_has_a_snippet_per_step() -> None:
    joined = "".join(code for _, code in fenced_blocks(ROOT / "docs" / "pretrained.md", "python"))
    for call in (
        "pretrained.load(",
        "loops=",
        "solver=",
        "pretrained.diagnose(",
        ".generate(",
        ".save_pretrained(",
    ):
        assert call in joined, call


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one directory every page's snippets run in."""
    return tmp_path_factory.mktemp("docs")


@pytest.mark.filterwarnings("ignore::eqloop.core.implicit.ConvergenceWarning")
@pytest.mark.parametrize("path", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_python_blocks_run_as_written(
    path: Path, docs_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(docs_dir)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the lm-eval example reads local files
    namespace: dict = {"__name__": "__main__"}
    for line, code in fenced_blocks(path, "python"):
        exec(compile(code, f"{path.name}:{line}", "exec"), namespace)  # noqa: S102
    for name in WRITES.get(path.name, []):
        assert (docs_dir / name).exists(), f"{path.name}: the snippets did not write {name}"
    if path.name == "pretrained.md":
        assert "loop" in capsys.readouterr().out  # diag.table() was printed


# ----------------------------------------------------------------------- shell commands


def shell_commands(path: Path) -> list[tuple[int, list[str]]]:
    """Each command of the ```bash blocks, continuation lines joined, as argv words."""
    commands = []
    for start, code in fenced_blocks(path, "bash"):
        for text in code.replace("\\\n", " ").splitlines():
            words = shlex.split(text, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                words = words[1:]
            if words and words[0] == "torchrun" and "-m" in words:  # -m eqloop.cli SUB ...
                words = ["eqloop", *words[words.index("-m") + 2 :]]
            if words:
                commands.append((start, words))
    return commands


def help_text(words: list[str]) -> str | None:
    """The ``--help`` of the eqloop command ``words`` names, or None for other programs."""
    if words[0] == "eqloop":
        main, argv = importlib.import_module("eqloop.cli").main, [words[1], "--help"]
    elif words[0] == "eqloop-lm-eval":  # lm-eval >= 0.4.10 lists its flags under `run`
        main, argv = importlib.import_module("eqloop.evaluation.harness").main, ["run", "--help"]
    elif words[0] == "python" and words[1].startswith(("benchmarks/", "experiments/")):
        module = importlib.import_module(words[1].removesuffix(".py").replace("/", "."))
        main, argv = getattr(module, "parse_args", module.main), ["--help"]
    else:
        return None
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code in (0, None), f"{' '.join(words[:2])} --help failed"
    return out.getvalue()


def test_commands_shown_exist_with_their_flags() -> None:
    helps: dict[str, str | None] = {}
    checked = 0
    for path in [*DOC_FILES, *EXPERIMENT_READMES]:
        for line, words in shell_commands(path):
            key = " ".join(words[:2])
            if key not in helps:
                helps[key] = help_text(words)
            if helps[key] is None:
                continue
            checked += 1
            for word in words:
                flag = word.split("=")[0]
                if flag.startswith("--"):
                    assert flag in helps[key], f"{path.name}:{line}: {key} has no {flag}"
    assert checked >= 20


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_between_the_pages_resolve() -> None:
    pages = [*DOC_FILES, *EXPERIMENT_READMES]
    anchors = {
        path.resolve(): {_anchor(m) for m in re.findall(r"^#+ (.*)$", path.read_text(), re.M)}
        for path in pages
    }
    checked = 0
    for path in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path.resolve()
            assert resolved.exists(), f"{path.name}: link to missing {target}"
            if anchor:
                assert anchor in anchors.get(resolved, set()), f"{path.name}: no anchor {target}"
            checked += 1
    assert checked >= 30


def test_every_experiment_is_a_folder_with_script_readme_and_results() -> None:
    names = [path.name for path in EXPERIMENTS]
    for name in ("stars_scaling", "finetune_stars", "tune_lambda", "equilibrium", "plateau"):
        assert name in names, f"experiments/{name}/run.py is missing"
        assert not (ROOT / "benchmarks" / f"{name}.py").exists(), f"benchmarks/{name}.py"
    for path in EXPERIMENTS:
        assert (path / "__init__.py").exists(), f"experiments/{path.name}/__init__.py"
        assert any((path / "results").iterdir()), f"experiments/{path.name}/results is empty"
        scripts = {words[1] for _, words in shell_commands(path / "README.md") if len(words) > 1}
        assert f"experiments/{path.name}/run.py" in scripts, f"{path.name}/README.md: no command"


def test_result_files_named_in_the_text_exist() -> None:
    """Every ``benchmarks/results/...`` or ``experiments/*/results/...`` file the pages name
    outside their command blocks (where they are outputs) is in the repository."""
    checked = 0
    for path in [*DOC_FILES, *EXPERIMENT_READMES]:
        text = path.read_text(encoding="utf-8")
        prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
        for name in re.findall(r"(?:benchmarks|experiments/\w+)/results/[\w.]+\.\w+", prose):
            assert (ROOT / name).exists(), f"{path.name}: {name} does not exist"
            checked += 1
    assert checked >= 10
