"""Start ``kvpipe serve`` as a subprocess on a free loopback port and wait until it is healthy (shared by the
serve end-to-end tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_serve(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """``kvpipe serve ARGS`` on a free port; yields its base URL once ``/health`` answers (the log goes to
    ``log_path``); terminated on exit."""
    port = free_port()
    log = log_path.open("wb")
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "KVPIPE_LOG_LEVEL": "INFO", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "kvpipe.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             *args], stdout=log, stderr=subprocess.STDOUT, env=full_env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kvpipe serve exited with {proc.returncode}:\n" + log_path.read_text()[-3000:])
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("kvpipe serve did not become healthy:\n" + log_path.read_text()[-3000:])
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
