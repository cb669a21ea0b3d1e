"""A study shared through a real PostgreSQL server, the storage for studies across machines.

Two ``eqloop tune`` workers share a study; one is killed with SIGKILL in the middle of a
trial and restarted. Its trial's heartbeat goes stale, a worker fails it and Optuna's
``RetryHeartbeatStaleTrialCallback`` queues it again; the study must end with exactly
``n_trials`` complete trials, the killed one retried with its parameters, run directory
and checkpoints.

The server is ``EQLOOP_TEST_POSTGRES_URL`` if set (``.ci/run`` starts the system
cluster and sets it), else a throwaway cluster that the test makes with ``initdb`` in a
temporary directory (as the ``postgres`` user when run as root), listening only on a
socket in that directory. Without either the test skips and says how to run it; in CI
(``CI`` or ``EQLOOP_TEST_POSTGRES_URL`` set) it fails instead.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import finish_worker, retried_from, tiny_tune_base, tune_worker, wait_for

optuna = pytest.importorskip("optuna")

from optuna.trial import TrialState  # noqa: E402

from eqloop.recipes.tune.storage import parse as parse_storage  # noqa: E402

URL_VARIABLE = "EQLOOP_TEST_POSTGRES_URL"
HOW_TO_RUN = (
    "install PostgreSQL (Debian: apt-get install postgresql) so that initdb is found, or "
    f"point {URL_VARIABLE} at a database, e.g. postgresql://USER:PASSWORD@localhost/DB"
)
GRACE = 3  # seconds of heartbeat silence after which a running trial counts as dead


def _unavailable(reason: str) -> None:
    """Skip on a developer machine; fail in CI, where the test must run."""
    if os.environ.get("CI") or os.environ.get(URL_VARIABLE):
        pytest.fail(f"PostgreSQL test cannot run: {reason}")
    pytest.skip(f"{reason}; to run it, {HOW_TO_RUN}")


def _initdb() -> str | None:
    """initdb on the PATH, else the newest Debian-installed one, else None."""
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    return shutil.which("initdb") or (debian[-1] if debian else None)


def _version(path: str) -> float:
    return float(Path(path).parents[1].name)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL: the configured server, or a throwaway local cluster."""
    try:
        import psycopg2
    except ImportError:
        _unavailable("the PostgreSQL driver is missing (pip install psycopg2-binary)")
    url = os.environ.get(URL_VARIABLE)
    if url:
        try:
            psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://")).close()
        except psycopg2.Error as err:
            pytest.fail(f"{URL_VARIABLE}={url} is unreachable: {err}")
        yield url
        return
    initdb = _initdb()
    if initdb is None:
        _unavailable("no PostgreSQL server (initdb not found)")
    yield from _throwaway_cluster(Path(initdb).parent)


def _throwaway_cluster(bindir: Path) -> Iterator[str]:
    """initdb + pg_ctl start in a temporary directory; the socket is its only listener."""
    root = Path(tempfile.mkdtemp(prefix="eqloop-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = root / "data", root / "server.log"
    options = f"-k {root} -c listen_addresses='' -c fsync=off"

    def run(*cmd: str) -> None:
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True)
        if done.returncode:
            server = log.read_text() if log.exists() else ""
            pytest.fail(f"{' '.join(cmd)} failed: {done.stderr}{server}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start")
        yield f"postgresql://postgres@/postgres?host={root}"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow  # 22 s; .ci/run runs it (-k postgres)
def test_killed_worker_on_postgres_is_retried_from_its_heartbeat(
    postgres_url: str, tmp_path: Path, data_cache: Path, processes: list[subprocess.Popen[str]]
) -> None:
    study_name = f"pg-{uuid.uuid4().hex[:12]}"  # the CI database outlives the test
    n_trials = 4
    config = tmp_path / "tune.json"
    base = tiny_tune_base(data_cache, steps=60, eval_every=20, checkpoint_every=20)
    settings = {"study_name": study_name, "study_dir": str(tmp_path / "study"), "base": base}
    settings.update(storage=postgres_url, n_trials=n_trials, loops=[2, 4], pruner="none")
    settings.update(progress=False, heartbeat_interval=1, grace_period=GRACE)
    config.write_text(json.dumps(settings))
    storage = optuna.storages.RDBStorage(parse_storage(postgres_url)[0])  # picks the driver

    def trials() -> list[Any]:
        return optuna.load_study(study_name=study_name, storage=storage).get_trials()

    first, second = tune_worker(config), tune_worker(config)
    processes.extend([first, second])

    def first_is_training() -> bool:
        return any(is_training(t, first.pid) for t in trials())

    wait_for(first_is_training, what="the first worker to train past a checkpoint")
    first.kill()
    first.wait(timeout=60)
    killed_at = time.time()
    (killed,) = [t for t in trials() if t.state == TrialState.RUNNING and owner(t) == first.pid]
    time.sleep(GRACE + 1)  # the heartbeat is stale now
    restarted = tune_worker(config)
    processes.append(restarted)
    outputs = [finish_worker(restarted, timeout=180), finish_worker(second, timeout=180)]

    final = trials()
    complete = [t for t in final if t.state == TrialState.COMPLETE]
    assert len(complete) == n_trials, outputs
    assert final[killed.number].state == TrialState.FAIL
    others = [t for t in final if t.state != TrialState.COMPLETE and t.number != killed.number]
    assert all(t.state == TrialState.FAIL and t.user_attrs["surplus"] for t in others)
    (retry,) = [t for t in final if retried_from(t) == killed.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retry_of"] == killed.number
    assert retry.params == killed.params
    assert retry.user_attrs["run_dir"] == killed.user_attrs["run_dir"]
    assert len({t.user_attrs["run_dir"] for t in complete}) == n_trials  # no duplicates
    # the retry resumed from the killed attempt's checkpoint instead of starting over
    early = Path(retry.user_attrs["checkpoint_dir"]) / "step_00000020" / "manifest.json"
    assert early.stat().st_mtime < killed_at
    assert {owner(t) for t in complete} <= {first.pid, second.pid, restarted.pid}


def owner(trial: Any) -> int | None:
    return trial.user_attrs.get("worker", {}).get("pid")


def is_training(trial: Any, pid: int) -> bool:
    """Running in worker ``pid`` and past its first checkpoint (step 20)."""
    steps = trial.user_attrs.get("steps_run", 0)
    return trial.state == TrialState.RUNNING and owner(trial) == pid and steps >= 40
