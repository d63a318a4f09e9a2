"""An embedded PostgreSQL (from the pgserver wheel) listening on a unix socket,
its data kept across stops, restarts and SIGKILLs.

As root, pgserver runs postgres as the ``pgserver`` system user: it chowns the
data directory to that user and opens read/execute on every parent directory."""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import psutil

from esper.errors import ConfigError, ServerStartError
from esper.infra.processes import kill_tree

with warnings.catch_warnings():
    # pgserver asks platformdirs for XDG_RUNTIME_DIR at import and warns when unset.
    warnings.simplefilter("ignore")
    import pgserver
    from pgserver import _commands
    from pgserver import postgres_server as _pgs
    from pgserver.utils import PostmasterInfo

# pgserver makes one function per bundled binary when it is imported.
pg_ctl = _commands.pg_ctl  # type: ignore[attr-defined]
POSTGRES_BIN_PATH = _commands.POSTGRES_BIN_PATH
PG_USER = "postgres"


class PostgresServer:
    """One PostgreSQL cluster in ``data_dir/pgdata``. ``url`` is the
    ``postgresql+asyncpg://`` URL of its ``postgres`` database."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._handle: Any = None  # the pgserver handle of the running server
        self._socket_dir: Path | None = None  # kept while stopped: the URL stays valid

    @classmethod
    def start(cls, data_dir: Path) -> PostgresServer:
        """Start (initdb on first use) and wait until it accepts connections."""
        server = cls(data_dir)
        server._boot()
        return server

    # -- addresses -----------------------------------------------------------
    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def socket_dir(self) -> Path:
        if self._socket_dir is None:
            raise ServerStartError(f"PostgreSQL in {self.pgdata} was never started")
        return self._socket_dir

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` on this server. asyncpg reaches a unix
        socket through the ``host`` query parameter (the URL has no host part)."""
        return (
            f"postgresql+asyncpg://{PG_USER}@/{quote(database)}"
            f"?host={quote(str(self.socket_dir), safe='/')}"
        )

    @property
    def pid(self) -> int | None:
        info = self._info()
        return info.pid if info is not None and _alive(info.pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- lifecycle -----------------------------------------------------------
    def _boot(self) -> None:
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._handle = pgserver.get_server(self.pgdata, cleanup_mode=None)
        except (subprocess.SubprocessError, AssertionError, OSError) as exc:
            raise ServerStartError(
                f"PostgreSQL in {self.pgdata} failed to start: {exc}\n{self._log_tail()}"
            ) from exc
        info = self._info()
        if info is None or info.socket_dir is None:
            raise ServerStartError(f"PostgreSQL in {self.pgdata} started without a socket")
        self._socket_dir = Path(info.socket_dir)
        atexit.register(self._at_exit)

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown: running transactions roll back, clients are disconnected."""
        if self.running:
            pg_ctl(
                ["-w", "-t", str(int(timeout)), "-m", "fast", "stop"],
                pgdata=self.pgdata,
                user=self._system_user(),
            )
        self._forget()

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend: a crash; the next start
        replays the WAL."""
        info = self._info()
        if info is not None and _alive(info.pid):
            kill_tree(info.pid)
            if psutil.pid_exists(info.pid):
                # An unreaped zombie still owns the pid: postgres would take the
                # lock files for a live postmaster and refuse to start.
                (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
                if info.socket_dir is not None:
                    for name in (".s.PGSQL.5432", ".s.PGSQL.5432.lock"):
                        (Path(info.socket_dir) / name).unlink(missing_ok=True)
        self._forget()

    def configure(self, **settings: str) -> None:
        """ALTER SYSTEM SET each setting (kept across restarts) and reload.
        Settings that need a restart (e.g. max_connections) apply after ``restart``.
        Tests use ``fsync="off"``: safe against killed processes, not power loss."""
        for name in settings:
            if not name.replace("_", "").replace(".", "").isalnum():
                raise ValueError(f"invalid setting name {name!r}")
        # One -c per statement: ALTER SYSTEM refuses to run inside a transaction.
        args = [str(POSTGRES_BIN_PATH / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        args += ["-d", self.libpq_uri()]
        for name, value in settings.items():
            args += ["-c", f"ALTER SYSTEM SET {name} = '{value}'"]
        args += ["-c", "SELECT pg_reload_conf()"]
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ConfigError(f"PostgreSQL rejected {settings}: {done.stderr.strip()}")

    def libpq_uri(self, database: str = "postgres") -> str:
        """The plain ``postgresql://`` URI (psql, libpq, asyncpg.connect)."""
        return self.url_for(database).replace("postgresql+asyncpg://", "postgresql://", 1)

    def restart(self) -> None:
        """Stop (if running) and start again on the same data directory."""
        self.stop()
        self._boot()

    def _forget(self) -> None:
        # pgserver caches one handle per pgdata and would hand back the dead one;
        # its atexit hook would also trip over the missing cache entry.
        handle, self._handle = self._handle, None
        if handle is not None:
            atexit.unregister(handle._cleanup)
            with contextlib.suppress(OSError, ValueError):
                handle.global_process_id_list.get_and_remove(os.getpid())
        _pgs.PostgresServer._instances.pop(self.pgdata, None)
        atexit.unregister(self._at_exit)

    def _info(self) -> Any:
        try:
            return PostmasterInfo.read_from_pgdata(self.pgdata)
        except (OSError, ValueError, AssertionError):
            return None  # absent, or half-written while postgres starts

    def _system_user(self) -> str | None:
        return "pgserver" if os.geteuid() == 0 else None

    def _at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(timeout=10.0)

    def _log_tail(self, n: int = 30) -> str:
        try:
            lines = (self.pgdata / "log").read_text(errors="replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"PostgresServer({state}, pgdata={self.pgdata})"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
