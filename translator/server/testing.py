"""Running `translator serve` from tests and benchmarks: a free loopback port, a server process
on it, and waiting until it is ready."""

import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model, *args: str, port: int | None = None, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
) -> tuple[subprocess.Popen, str]:
    """`translator serve --model MODEL` on a loopback port, in a new process.

    Returns the process and the server's base URL (`http://127.0.0.1:PORT`, no trailing slash).
    `args` are more `translator serve` options; the caller stops the process.
    """
    port = port or free_port()
    command = [sys.executable, "-m", "translator.cli", "serve", "--model", str(model)]
    command += ["--host", "127.0.0.1", "--port", str(port), *args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen | None = None, seconds: float = 180) -> bool:
    """Polls `url`/readyz until it answers 200 (True); False when `proc` exits or time is up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if httpx.get(url.rstrip("/") + "/readyz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def stop_server(proc: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds; its exit status."""
    proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout=timeout)
