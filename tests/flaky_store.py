"""A flaky object store for tests: an HTTP proxy in front of the emulated bucket (:mod:`tests.object_store`) that
answers a chosen fraction of requests with 503 or 429, drops the connection of others (before the store sees the
request, or after the store has applied it, so that the client cannot know whether a write happened), delays
others, or fails every request for a while (an outage). Every Cloud Storage client of a run (gcsfs, the Cloud
Storage client, TensorStore) goes through it when :func:`tests.object_store.emulator_env` is given its URL.

Which request meets which fault is drawn from a seeded generator; requests arrive from several threads and
processes, so the order (and so the exact requests that fail) can differ between runs, while the fractions hold.
The proxy listens on 127.0.0.1 only.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http.client
import http.server
import json
import os
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator

import fsspec

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "content-length"}


@dataclasses.dataclass(frozen=True)
class Faults:
    """What the proxy does to requests (fractions of all requests, drawn independently of each other's kinds)."""

    fail: float = 0.0  # answered 503 or 429 (half each) without reaching the store
    drop_before: float = 0.0  # connection closed before the store sees the request
    drop_after: float = 0.0  # forwarded and applied by the store, then the connection is closed: outcome unknown
    delay: float = 0.0  # held for delay_s before being forwarded
    delay_s: float = 0.2
    outage: bool = False  # every request answered 503 (the store is down)

    @property
    def failing(self) -> float:
        """The fraction of requests that do not get the store's answer."""
        return 1.0 if self.outage else self.fail + self.drop_before + self.drop_after


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client that hung up: nothing to report
        pass


class FlakyStore:
    """The proxy, serving in a background thread: ``with FlakyStore(upstream, Faults(...), seed=0) as proxy:``
    then point clients at ``proxy.url``. ``counts`` tallies what happened to each request (``forwarded``,
    ``503``, ``429``, ``drop_before``, ``drop_after``, ``delayed``, ``outage``); :meth:`set_faults` changes the
    faults while clients run."""

    def __init__(self, upstream: str, faults: Faults = Faults(), seed: int = 0):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.faults = faults
        self.counts: collections.Counter = collections.Counter()
        self.clients: collections.Counter = collections.Counter()  # requests by client (User-Agent's first word)
        self._rng = random.Random(seed)
        self._queued: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="flaky-store", daemon=True)

    def __enter__(self) -> "FlakyStore":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def set_faults(self, faults: Faults) -> None:
        with self._lock:
            self.faults = faults

    def queue(self, *kinds: str) -> None:
        """The next requests meet ``kinds`` in order ("503", "429", "drop_before", "drop_after", "delayed",
        "forwarded"), whatever the faults say."""
        with self._lock:
            self._queued.extend(kinds)

    @property
    def requests(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "delayed")

    def failed_fraction(self) -> float:
        """The fraction of requests so far that did not get the store's answer."""
        failed = sum(v for k, v in self.counts.items() if k not in ("forwarded", "delayed"))
        return failed / max(self.requests, 1)

    def _decide(self) -> str:
        with self._lock:
            f = self.faults
            if self._queued:
                kind = self._queued.popleft()
            elif f.outage:
                kind = "outage"
            else:
                r = self._rng.random()
                edges = [("fail", f.fail), ("drop_before", f.drop_before), ("drop_after", f.drop_after),
                         ("delayed", f.delay)]
                kind = "forwarded"
                for name, fraction in edges:
                    if r < fraction:
                        kind = name
                        break
                    r -= fraction
                if kind == "fail":
                    kind = "503" if self._rng.random() < 0.5 else "429"
            self.counts[kind] += 1
            if kind == "delayed":
                self.counts["forwarded"] += 1
            return kind

    def _forward(self, method: str, target: str, headers, body: bytes) -> tuple[int, str, list, bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            out = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
            out["Content-Length"] = str(len(body))
            conn.request(method, target, body=body if body or method not in ("GET", "HEAD") else None, headers=out)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _handler_class(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _drop(self) -> None:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _send(self, status: int, reason: str, headers: list, body: bytes) -> None:
                self.send_response(status, reason)
                for k, v in headers:
                    if k.lower() not in HOP_BY_HOP:
                        upstream = f"{proxy.upstream.scheme}://{proxy.upstream.netloc}"
                        self.send_header(k, v.replace(upstream, proxy.url))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                proxy.clients[(self.headers.get("User-Agent") or "-").split("/")[0].split()[0]] += 1
                kind = proxy._decide()
                if kind in ("503", "429", "outage"):
                    code = 429 if kind == "429" else 503
                    message = {"error": {"code": code, "message": f"injected fault: HTTP {code}"}}
                    self._send(code, "Injected", [("Content-Type", "application/json")],
                               json.dumps(message).encode())
                    return
                if kind == "drop_before":
                    self._drop()
                    return
                if kind == "delayed":
                    time.sleep(proxy.faults.delay_s)
                try:
                    status, reason, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                except OSError:
                    self._drop()
                    return
                if kind == "drop_after":
                    self._drop()
                    return
                self._send(status, reason, headers, data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        return Handler


@contextlib.contextmanager
def clients_pointed_at(url: str) -> Iterator[None]:
    """Points this process's Cloud Storage clients at ``url`` (e.g. a :class:`FlakyStore`) for the block: the
    environment of :func:`tests.object_store.emulator_env`, and fresh gcsfs instances (fsspec and etils cache
    them with the address they were made with)."""
    from etils.epath import backend

    from tests.object_store import emulator_env

    def fresh() -> None:
        backend.fsspec_backend._get_filesystem.cache_clear()
        fsspec.get_filesystem_class("gs").clear_instance_cache()

    env = emulator_env(url)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fresh()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fresh()
