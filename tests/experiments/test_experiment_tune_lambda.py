"""experiments/tune_lambda/run.py: --overwrite starts a study of the same name again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_experiment


@pytest.mark.slow
def test_overwrite_replaces_a_study_of_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = (
        "--quick",
        "--no-progress",
        "--out-dir",
        str(out),
        "--study-name",
        "q",
        "--repeats",
        "1",
        "--data-cache-dir",
        str(tmp_path / "cache"),
    )
    first = run_experiment("tune_lambda", *args, "--lams", "0.001")
    assert first.returncode == 0, first.stderr
    # The same study with another lam space is refused; --overwrite runs it anew.
    refused = run_experiment("tune_lambda", *args, "--lams", "0.1")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert (
        "experiments/tune_lambda/run.py: error:" in refused.stderr
        and "--overwrite deletes" in refused.stderr
    )
    again = run_experiment("tune_lambda", *args, "--lams", "0.1", "--overwrite")
    assert again.returncode == 0, again.stderr
    data = json.loads((out / "q" / "tune_lambda.json").read_text())
    assert [t["lam"] for t in data["trials"]] == [0.1]
    assert f"wrote {out / 'q' / 'tune_lambda.json'}" in again.stdout
