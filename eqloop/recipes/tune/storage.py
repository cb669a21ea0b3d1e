"""Where a study lives: an RDB (SQLite, PostgreSQL, MySQL) URL or ``journal:PATH``."""

from __future__ import annotations

import random
import time
from importlib.util import find_spec
from pathlib import Path

from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage

from eqloop.recipes.tune.config import TuneConfig, experimental_api


def parse(storage: str) -> tuple[str, Path | None]:
    """Check a storage's syntax; return it with local paths made absolute, and its local
    file (journal or SQLite database; None for a server). A ``postgresql://`` URL without
    a driver gets psycopg2 when psycopg 3 (SQLAlchemy 2.1's default) is not installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if not isinstance(storage, str) or not storage.strip() or storage == "journal:":
        raise ValueError(f"storage must be journal:PATH or a database URL, got {storage!r}")
    if storage.startswith("journal:"):
        file = Path(storage.removeprefix("journal:")).resolve()
        return f"journal:{file}", file
    try:
        url = make_url(storage)
    except ArgumentError as err:
        raise ValueError(
            f"invalid storage {storage!r}: expected journal:PATH or a database URL "
            "(sqlite:///PATH, postgresql://USER:PASSWORD@HOST/DB, ...)"
        ) from err
    if url.drivername == "postgresql" and not find_spec("psycopg") and find_spec("psycopg2"):
        url = url.set(drivername="postgresql+psycopg2")
    file = None
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise ValueError(f"storage {storage!r}: a SQLite storage needs a file (sqlite:///PATH)")
        url = url.set(database=str(file := Path(url.database).resolve()))
    return url.render_as_string(hide_password=False), file


def redact(storage: str) -> str:
    """``storage`` without its password, for messages and reports."""
    from sqlalchemy.engine import make_url

    is_url = not storage.startswith("journal:")
    return make_url(storage).render_as_string(hide_password=True) if is_url else storage


def retry_callback(max_retry: int) -> RetryHeartbeatStaleTrialCallback:
    """Optuna's callback that queues a failed trial again with its parameters, user
    attributes and intermediate values (at most ``max_retry`` times per trial)."""
    with experimental_api():  # marked experimental since Optuna 2.8
        return RetryHeartbeatStaleTrialCallback(max_retry, inherit_intermediate_values=True)


def connect(config: TuneConfig) -> tuple[BaseStorage, str]:
    """Open (creating if needed) the storage; return it and its normalised name. RDB storages
    get heartbeats: a trial silent for ``grace_period`` s is failed by the next worker to start
    a trial and queued again by :func:`retry_callback`. Errors are ValueErrors."""
    from sqlalchemy.exc import DBAPIError

    default = f"sqlite:///{Path(config.study_dir).resolve() / 'study.db'}"
    storage, file = parse(config.storage or default)
    for attempt in range(3):  # workers starting together on a new database race to create it
        try:
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
            if storage.startswith("journal:"):
                return JournalStorage(JournalFileBackend(str(file))), storage
            retry, engine = retry_callback(config.max_retry), {"connect_args": {"timeout": 60}}
            with experimental_api():  # heartbeat_interval: marked experimental since Optuna 2.9
                rdb = RDBStorage(
                    storage,
                    engine if file else None,
                    heartbeat_interval=config.heartbeat_interval,
                    grace_period=config.grace_period,
                    heartbeat_stale_trial_callback=retry,
                )
            return rdb, storage
        except Exception as err:  # driver import errors, connection errors, bad files
            if attempt == 2 or not isinstance(err, DBAPIError):
                raise ValueError(f"cannot open storage {redact(storage)}: {err}") from err
            time.sleep(random.uniform(0.2, 1.0))
    raise AssertionError("unreachable")
