"""`decal serve` in a child process, for tests, benchmarks and scripts that need a real server.

`ServeProcess(["--model", M, "--task", T]).start()` runs ``python -m decal serve ... --port 0``
(the server picks a free loopback port and logs it), keeps its log, waits until GET /ready
answers 200, and `stop()` sends SIGTERM and returns the exit status.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

__all__ = ["ServeProcess"]

_LISTENING = re.compile(r"listening on (http://\S+?:\d+)")


class ServeProcess:
    """A `decal serve` child process (module docstring).

    Args:
        args: `decal serve` arguments; ``--port 0`` is added unless a port is given.
        env: the child's environment (default: this process's).
        startup_timeout: seconds to wait for /ready before giving up.
    """

    def __init__(self, args: Sequence[str], *, env: dict | None = None, startup_timeout: float = 600.0):
        self.args = list(args) if "--port" in args else [*args, "--port", "0"]
        self.env = dict(os.environ if env is None else env)
        self.startup_timeout = startup_timeout
        self.url: str | None = None
        self.returncode: int | None = None
        self._lines: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._sent: set[int] = set()  # signals sent with send_signal

    @property
    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return "".join(self._lines)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _read(self) -> None:
        for line in self._proc.stdout:
            self._lines.append(line)

    def start(self) -> "ServeProcess":
        """Start the server and wait until it is ready; RuntimeError (with the log) if it exits first."""
        import httpx

        self._proc = subprocess.Popen(
            [sys.executable, "-m", "decal", "serve", *self.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=self.env, bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._reader.join(timeout=5)
                raise RuntimeError(f"decal serve exited with status {self._proc.returncode}:\n{self.log[-4000:]}")
            if self.url is None:
                match = _LISTENING.search(self.log)
                self.url = match.group(1) if match else None
            if self.url is not None:
                try:
                    if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"decal serve was not ready within {self.startup_timeout:g} s:\n{self.log[-4000:]}")

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the server without waiting (e.g. SIGTERM while clients are still sending)."""
        self._sent.add(sig)
        self._proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        """Send `sig` and wait for the exit status (SIGKILL after `timeout` seconds)."""
        if self._proc is None:
            raise RuntimeError("the server was never started")
        if self._proc.poll() is None:
            # A signal already sent is not sent again: a second SIGTERM that lands after the server
            # has drained and put back the default handlers ends it with -15 instead of its own 0
            # (seen when a loaded machine made the drain slow).
            if sig not in self._sent:
                self._proc.send_signal(sig)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._reader.join(timeout=10)
        self.returncode = self._proc.returncode
        return self.returncode

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
