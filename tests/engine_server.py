"""A real inference server for tests: llama-cpp-python's `llama_cpp.server` on 127.0.0.1, plus a loopback TCP
proxy that can slow down or cut the server's replies (fault tests). Nothing here imitates a server protocol."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SERVER_DEPS = ("sse_starlette", "starlette_context", "pydantic_settings", "fastapi", "uvicorn")

_ORIG_CONNECT = socket.socket.connect
_ORIG_CONNECT_EX = socket.socket.connect_ex
_ORIG_GETADDRINFO = socket.getaddrinfo
_ORIG_CREATE_CONNECTION = socket.create_connection


def missing_server_deps() -> list[str]:
    import importlib.util

    return [m for m in SERVER_DEPS if importlib.util.find_spec(m) is None]


def _is_loopback(host) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host).strip("[]")).is_loopback
    except ValueError:
        return False


def allow_loopback_only(monkeypatch) -> None:
    """Undo the suite's network cut for loopback addresses only; anything else still fails."""

    def refuse(what, target):
        raise AssertionError(f"network access attempted outside loopback: {what}{target!r}")

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            refuse("connect", address)
        return _ORIG_CONNECT(sock, address)

    def connect_ex(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            refuse("connect_ex", address)
        return _ORIG_CONNECT_EX(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            refuse("getaddrinfo", host)
        return _ORIG_GETADDRINFO(host, *args, **kwargs)

    def create_connection(address, *args, **kwargs):
        if not _is_loopback(address[0]):
            refuse("create_connection", address)
        return _ORIG_CREATE_CONNECTION(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", create_connection)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LlamaCppPythonServer:
    """`python -m llama_cpp.server` with `model` on 127.0.0.1 (a free port). `log` collects its stderr/stdout,
    which includes llama-cpp-python's own prefix-cache lines ("N prefix-match hit, remaining M ...")."""

    def __init__(self, model: os.PathLike, log_path: os.PathLike, n_ctx: int = 4096, threads: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--interrupt_requests", "false", "--verbose", "true"]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited ({self.proc.returncode}): {self.log_text()[-2000:]}")
            try:
                with _ORIG_CREATE_CONNECTION(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"GET /v1/models HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                    if s.recv(16).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("llama_cpp.server did not start in time")

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class FaultProxy:
    """A loopback TCP proxy in front of a real server. `delay_s`: each chunk of the server's reply is held this
    long. `cut_after`: a streamed completion's reply is cut (both sockets closed) after this many bytes.
    `hang = True` (at any time): requests are swallowed, never forwarded, never answered (a hung server, also on
    connections already open). `kill()`: the port goes dead: listener and every open connection closed."""

    def __init__(self, upstream_port: int, delay_s: float = 0.0, cut_after: int | None = None):
        self.upstream_port, self.delay_s, self.cut_after = upstream_port, delay_s, cut_after
        self.cuts = 0
        self.hang = False
        self._open: list[socket.socket] = []
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(16)
        self.port = self._srv.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = _ORIG_CREATE_CONNECTION(("127.0.0.1", self.upstream_port), timeout=30)
        except OSError:
            client.close()
            return
        self._open += [client, upstream]
        state = {"streaming": False}

        def pump_up():
            try:
                while True:
                    data = client.recv(65536)
                    if not data:
                        break
                    if self.hang:
                        continue
                    state["streaming"] = state["streaming"] or b'"stream":true' in data.replace(b" ", b"")
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=pump_up, daemon=True).start()
        sent = 0
        try:
            while True:
                data = upstream.recv(4096)
                if not data:
                    break
                if self.delay_s and state["streaming"]:
                    time.sleep(self.delay_s)
                if self.cut_after is not None and state["streaming"] and sent + len(data) > self.cut_after:
                    client.sendall(data[: max(0, self.cut_after - sent)])
                    self.cuts += 1
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._stop = True
        try:
            self._srv.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(): only then is the port really closed
        except OSError:
            pass
        self._srv.close()

    def kill(self) -> None:
        self.close()
        for s in self._open:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
