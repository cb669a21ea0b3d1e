"""The README's "Pretrained looped LMs" snippets run as written, in order."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def section_snippets() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("### Pretrained looped LMs")
    end = text.index("\n## ", start)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_section_has_a_snippet_per_step():
    snippets = section_snippets()
    joined = "\n".join(snippets)
    for call in (
        "pretrained.load(",
        "loops=",
        "solver=",
        "pretrained.diagnose(",
        ".generate(",
        ".save_pretrained(",
    ):
        assert call in joined, call


@pytest.mark.filterwarnings("ignore::eqloop.implicit.ConvergenceWarning")
def test_snippets_run_on_tiny_checkpoints(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(section_snippets()):
        exec(compile(code, f"README pretrained snippet {i + 1}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "toy-diag.json").is_file() and (tmp_path / "toy-diag.png").is_file()
    assert (tmp_path / "toy-ouro-saved" / "config.json").is_file()
    assert "loop" in capsys.readouterr().out
