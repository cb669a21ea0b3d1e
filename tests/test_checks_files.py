"""Tests for the shared argument checks (solvers.checks) and atomic writes (eqloop.files)."""

from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import pytest

from eqloop.files import (
    atomic_path,
    jsonl_records,
    umask_mode,
    write_figure_atomic,
    write_json_atomic,
    write_text_atomic,
)
from eqloop.plotting import pyplot
from solvers import checks


def test_integer_accepts_ints_and_rejects_bools_floats_and_out_of_range() -> None:
    assert checks.integer("n", 3, low=1) == 3
    with pytest.raises(TypeError, match="n must be an integer, got the bool True"):
        checks.integer("n", True)
    with pytest.raises(TypeError, match="n must be an integer, got float 2.0"):
        checks.integer("n", 2.0)
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 0"):
        checks.integer("n", 0, low=1)
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 4\], got 5"):
        checks.integer("n", 5, low=1, high=4)


def test_number_bounds_finiteness_and_bools() -> None:
    assert checks.number("tol", 0, low=0) == 0.0
    with pytest.raises(TypeError, match="tol must be a number, got bool True"):
        checks.number("tol", True, low=0)
    with pytest.raises(ValueError, match="tol must be a finite number, got inf"):
        checks.number("tol", math.inf, low=0)
    with pytest.raises(ValueError, match="tol must be a finite number, got nan"):
        checks.number("tol", math.nan)
    assert checks.number("ratio", math.inf, low=1, low_open=True, finite=False) == math.inf
    with pytest.raises(ValueError, match=r"tau must be a number > 0 and <= 1, got 0"):
        checks.number("tau", 0, low=0, low_open=True, high=1)
    with pytest.raises(TypeError, match="lr must be a number, got str '1e-3'"):
        checks.number("lr", "1e-3")


def test_boolean_choice_and_parse_bool() -> None:
    assert checks.boolean("resume", False) is False
    with pytest.raises(TypeError, match="resume must be true or false, got int 1"):
        checks.boolean("resume", 1)
    assert checks.choice("mode", "abs", ("abs", "rel")) == "abs"
    with pytest.raises(ValueError, match="mode must be one of 'abs', 'rel'; got 'x'"):
        checks.choice("mode", "x", ("abs", "rel"))
    for word, value in [("yes", True), ("OFF", False), ("1", True), ("false", False)]:
        assert checks.parse_bool("resume", word) is value
    with pytest.raises(ValueError, match=r"resume must be a boolean \(true/false"):
        checks.parse_bool("resume", "maybe")


def test_atomic_write_replaces_whole_file_and_follows_umask(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert target.read_text().endswith("\n")
    old = os.umask(0o027)
    try:
        write_text_atomic(target, "x")
        assert target.stat().st_mode & 0o777 == 0o640 == umask_mode()
    finally:
        os.umask(old)
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_atomic_path_leaves_target_untouched_on_error(tmp_path: Path) -> None:
    target = tmp_path / "plot.png"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_jsonl_records_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert list(jsonl_records(path)) == [(f"{path}:1", {"a": 1}), (f"{path}:3", {"b": 2})]
    for text, message in (
        ('{"a": 1}\n[1]\n', ":2: expected a JSON object, got list"),
        ('{"a": 1}\n{"b": \n', ":2: invalid JSON"),
        (b'{"a": "\xff"}\n', "not UTF-8 text"),
    ):
        with pytest.raises(ValueError, match=message):
            list(jsonl_records(path, text))


def test_write_figure_atomic_writes_the_suffix_format_or_nothing(tmp_path: Path) -> None:
    plt = pyplot()
    figure, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    write_figure_atomic(tmp_path / "new" / "a.png", figure, dpi=50)
    write_figure_atomic(tmp_path / "new" / "a.svg", figure)
    plt.close(figure)
    assert (tmp_path / "new" / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "new" / "a.svg").read_bytes()[:400]

    class Failing:
        def savefig(self, path: Path, **options: object) -> None:
            Path(path).write_bytes(b"half")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_figure_atomic(tmp_path / "b.png", Failing())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # no file, no temp left


def test_directories_are_staged_only_by_eqloop_files() -> None:
    root = Path(__file__).resolve().parents[1]
    for folder in ("eqloop", "solvers", "benchmarks", "experiments"):
        for path in sorted((root / folder).rglob("*.py")):
            name = path.relative_to(root).as_posix()
            if name == "eqloop/files.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), name)):
                call = node.func if isinstance(node, ast.Call) else None
                if isinstance(call, ast.Attribute) and isinstance(call.value, ast.Name):
                    spelled = f"{call.value.id}.{call.attr}"
                    assert spelled not in ("tempfile.mkdtemp", "os.replace", "os.rename"), (
                        f"{name}:{node.lineno} calls {spelled}: write directories with "
                        "eqloop.files.staged_directory and files with eqloop.files.atomic_path"
                    )
