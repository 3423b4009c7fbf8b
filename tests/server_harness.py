"""Start the real server (uvicorn, loopback, a free port) in-process or as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn on a thread of this process: real HTTP on loopback, and the engine at hand for
    white-box checks (KV blocks, adapter pins)."""

    def __init__(self, cfg) -> None:
        import uvicorn

        from loraplex.server.launch import build

        self.engine, self.app = build(cfg)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until the engine holds no request, no KV block and no adapter pin."""
        eng = self.engine.engine
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.engine.num_in_flight == 0 and not eng.has_unfinished_requests
                    and eng.block_manager.num_free == eng.block_manager.num_blocks
                    and (eng.lora is None or eng.lora.num_pinned == 0)):
                return
            time.sleep(0.05)
        raise AssertionError(
            f"engine not idle: in_flight={self.engine.num_in_flight} "
            f"requests={eng.num_requests} free_blocks={eng.block_manager.num_free}/"
            f"{eng.block_manager.num_blocks} pins={eng.lora.num_pinned if eng.lora else 0}")


def start_cli_server(args: list[str], env: dict | None = None, cwd: Path | None = None,
                     timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`loraplex serve ARGS --port P` as a subprocess; returns once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not come up: {proc.stdout.read()}")
