"""A real mosquitto broker on a free loopback port, owned by the process that started it.

Tests, benchmarks and the emulator need an MQTT broker that behaves exactly
like the one an edge server runs, so :class:`MosquittoBroker` starts the real
``mosquitto`` binary with a generated config in a private temporary directory
(0700: it holds the password file), waits until the listener accepts TCP
connections, and stops it by *its own* process id (SIGTERM, wait, SIGKILL,
wait) -- never by name, because other brokers on the machine are not ours.

Size limits and what a device sees (mosquitto 2.0, verified):

- ``message_size_limit`` makes the broker *silently drop* a larger PUBLISH
  while a QoS 1 publisher still gets its PUBACK, so the device believes it
  delivered. It is therefore never set here; the gateway's own size check
  answers an oversized update with a ``too-large`` ack instead.
- ``max_packet_size`` makes the broker *disconnect* a client that sends a
  larger packet (MQTT 3.1.1: the TCP connection closes; MQTT 5: the limit is
  also announced in CONNACK). The device sees no PUBACK and no ack, only a
  lost connection. Use it as a hard guard well above the gateway's update
  limit (the gateway's ``too-large`` ack then covers everything in between).

The process runs in the foreground (no ``-d``), so ``Popen.pid`` *is* the
broker and ``stop`` can wait for exactly that process. When running as root,
mosquitto would drop privileges to the ``mosquitto`` user and then fail to
read our 0700 directory, so the config names the current user explicitly.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["BrokerError", "MosquittoBroker", "free_port"]

_ADDRESS_IN_USE = "Address already in use"


class BrokerError(RuntimeError):
    """mosquitto is missing, refused its config, or did not come up in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _find(name: str) -> str:
    """``name`` on PATH, or in the sbin directories (Debian puts mosquitto in /usr/sbin)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if found is None:
        raise BrokerError(
            f"{name!r} not found on PATH or in /usr/sbin (Debian: apt-get install mosquitto)"
        )
    return found


class MosquittoBroker:
    """Start/stop one ``mosquitto`` process; a context manager.

    ``users`` (name -> password) turns on password authentication through a
    ``mosquitto_passwd``-made file and, unless ``allow_anonymous`` says
    otherwise, refuses anonymous clients. ``max_packet_size`` is the hard
    guard described in the module docstring. ``max_inflight_messages`` and
    ``max_queued_messages`` are per-client QoS 1 windows: the broker sends a
    subscriber at most ``max_inflight_messages`` unacknowledged messages and
    queues up to ``max_queued_messages`` more (0: no limit), beyond which it
    *drops* QoS 1 messages for that client -- size them for the burst a
    gateway must absorb. ``extra_config`` lines are appended verbatim.
    ``port=None`` picks a free port (and retries once with another if it was
    taken in the meantime); :meth:`restart` keeps the port.

    ``die_with_parent`` (Linux, util-linux ``setpriv``): the kernel sends the
    broker SIGTERM when the *thread* that started it ends, so a test run
    killed by a timeout leaves no orphan broker behind. Start it from a
    long-lived thread (the main thread), or pass False.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        users: Mapping[str, str] | None = None,
        allow_anonymous: bool | None = None,
        max_packet_size: int | None = None,
        max_inflight_messages: int = 20,
        max_queued_messages: int = 1000,
        extra_config: Sequence[str] = (),
        executable: str = "mosquitto",
        passwd_executable: str = "mosquitto_passwd",
        startup_timeout: float = 10.0,
        die_with_parent: bool = True,
    ) -> None:
        if max_packet_size is not None and max_packet_size < 20:
            raise ValueError(f"max_packet_size must be >= 20 bytes, got {max_packet_size}")
        if max_inflight_messages < 0 or max_queued_messages < 0:
            raise ValueError("max_inflight_messages and max_queued_messages must be >= 0")
        self.host = host
        self._fixed_port = port
        self.port = port if port is not None else 0
        self.users = dict(users or {})
        self.allow_anonymous = not self.users if allow_anonymous is None else allow_anonymous
        self.max_packet_size = max_packet_size
        self.max_inflight_messages = max_inflight_messages
        self.max_queued_messages = max_queued_messages
        self.extra_config = list(extra_config)
        self.executable = executable
        self.passwd_executable = passwd_executable
        self.startup_timeout = startup_timeout
        self.die_with_parent = die_with_parent
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: int | None = None

    # --- lifecycle ------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (the process :meth:`stop` ends)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def workdir(self) -> Path:
        if self._dir is None:
            raise BrokerError("broker was never started")
        return Path(self._dir.name)

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def log_text(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of the broker's log (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except (OSError, BrokerError):
            return ""

    def start(self) -> MosquittoBroker:
        """Write the config, start mosquitto and wait until it accepts connections."""
        if self.running:
            return self
        exe = _find(self.executable)
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="tierfl-mosquitto-")
            os.chmod(self._dir.name, 0o700)
            if self.users:
                self._write_password_file()
        attempts = 1 if self._fixed_port is not None or self.port else 3
        for attempt in range(attempts):
            if self._fixed_port is None and (attempt or not self.port):
                self.port = free_port(self.host)
            self._write_config()
            self._spawn(exe)
            try:
                self._wait_ready()
                return self
            except BrokerError:
                log = self.log_text()
                self._reap()
                if _ADDRESS_IN_USE in log and attempt + 1 < attempts:
                    continue
                raise
        raise BrokerError("unreachable")  # pragma: no cover

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop our broker process: SIGTERM, wait, SIGKILL, wait. Returns its exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it died on its own just now
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        return self._reap()

    def restart(self, down_s: float = 0.0) -> MosquittoBroker:
        """Stop and start again on the same port (clients see a broker outage)."""
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self._fixed_port = self.port
        return self.start()

    def close(self) -> None:
        """Stop the broker and remove its directory."""
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------

    def config_text(self) -> str:
        """The generated mosquitto.conf (see deploy/mosquitto.conf for the production one)."""
        lines = [
            "# generated by tierfl.gateway.broker for tests/benchmarks",
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "set_tcp_nodelay true",
            f"max_inflight_messages {self.max_inflight_messages}",
            f"max_queued_messages {self.max_queued_messages}",
        ]
        if self.users:
            lines.append(f"password_file {self.workdir / 'passwd'}")
        if self.max_packet_size is not None:
            lines.append(f"max_packet_size {self.max_packet_size}")
        lines.extend(self.extra_config)
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        self.config_path.write_text(self.config_text())

    def _write_password_file(self) -> None:
        exe = _find(self.passwd_executable)
        path = self.workdir / "passwd"
        for i, (user, password) in enumerate(self.users.items()):
            if ":" in user or not user:
                raise ValueError(f"MQTT user name {user!r} must be non-empty and have no ':'")
            cmd = [exe, *(["-c"] if i == 0 else []), "-b", str(path), user, password]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if proc.returncode != 0:
                raise BrokerError(
                    f"mosquitto_passwd failed for user {user!r}: "
                    f"{(proc.stderr or proc.stdout).strip()}"
                )
        os.chmod(path, 0o600)

    def _spawn(self, exe: str) -> None:
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            cmd = [exe, "-c", str(self.config_path)]
            setpriv = shutil.which("setpriv") if self.die_with_parent else None
            if setpriv is not None:  # setpriv execs mosquitto: the PID stays the broker's
                cmd = [setpriv, "--pdeathsig", "TERM", *cmd]
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C in a test run is ours to forward, not its
            )
        finally:
            os.close(log)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise BrokerError(
                    f"mosquitto exited with code {code} on {self.host}:{self.port}; "
                    f"log:\n{self.log_text()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(
                    f"mosquitto did not accept connections on {self.host}:{self.port} within "
                    f"{self.startup_timeout:g} s; log:\n{self.log_text()}"
                )
            time.sleep(0.02)

    def _reap(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        try:
            return proc.wait(5.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            os.kill(proc.pid, signal.SIGKILL)
            return proc.wait()
