"""A TCP proxy on 127.0.0.1 that puts a faulty network between a client and an HTTP
server (moto's S3, Azurite, fake-gcs-server), for tests: at the start of a request it
may reset the connection, answer ``503 SlowDown``, stall past the client's timeout, or
forward the request and cut the response short. Faults are drawn from a seeded
generator at a chosen rate, and counted. It listens only on the loopback address and
stops with :meth:`close`.

:class:`Frozen` measures the time this whole process stood still (no thread of it ran),
which the tests' wall-clock bounds leave out: a bound is on what the store's code waits
for, not on a pause of the machine or the interpreter.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections import Counter

METHODS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")
FAULTS = ("reset", "slowdown", "stall", "truncate")
_SLOWDOWN_BODY = (
    b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
)
SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n" % len(_SLOWDOWN_BODY)
) + _SLOWDOWN_BODY


class FaultProxy:
    def __init__(
        self,
        upstream: tuple[str, int],
        rate: float,
        seed: int = 0,
        faults: tuple[str, ...] = FAULTS,
        script: tuple[str | None, ...] = (),
    ) -> None:
        """``script``: the faults of the first requests, in order (None: forwarded as
        is), before any drawn at ``rate``."""
        self.upstream, self.rate, self.faults = upstream, rate, faults
        self._script = list(script)
        self.random = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.methods: Counter[str] = Counter()  # requests seen, by HTTP method
        self.heads: list[str] = []  # each request's line and headers, as sent
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _draw(self, method: str) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            self.methods[method] += 1
            if self._script:
                fault = self._script.pop(0)
            elif self.random.random() >= self.rate:
                return None
            else:
                fault = self.random.choice(self.faults)
            if fault is None:
                return None
            self.counts[fault] += 1
            return fault

    def _accept(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:  # an endpoint that does not answer is the client's timeout, not a hang here
            upstream = socket.create_connection(self.upstream, timeout=10)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        truncate = threading.Event()
        back = threading.Thread(
            target=self._pipe_back, args=(upstream, client, truncate), daemon=True
        )
        back.start()
        try:
            while not self._stop.is_set():
                data = client.recv(65536)
                if not data:
                    break
                starts = data.startswith(METHODS)
                fault = self._draw(data.split(b" ", 1)[0].decode()) if starts else None
                if starts:
                    with self._lock:
                        self.heads.append(data.split(b"\r\n\r\n", 1)[0].decode("latin-1"))
                if fault == "reset":
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    break
                if fault == "slowdown":
                    client.sendall(SLOWDOWN)
                    break
                if fault == "stall":  # hold the request until the client gives up
                    self._stop.wait(30)
                    break
                if fault == "truncate":
                    truncate.set()
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.close()

    @staticmethod
    def _pipe_back(
        upstream: socket.socket, client: socket.socket, truncate: threading.Event
    ) -> None:
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if truncate.is_set():  # half of the response, then the line goes dead
                    client.sendall(data[: max(1, len(data) // 2)])
                    # (shut down first: a close alone sends no FIN while the other
                    # thread is blocked reading the socket, and the client would wait)
                    with contextlib.suppress(OSError):
                        client.shutdown(socket.SHUT_RDWR)
                    client.close()
                    upstream.close()
                    return
                client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._server.close()


class Frozen:
    """How long this process stood still while in the ``with`` block: a thread of its
    own asks to run every 50 ms and counts each wait of over a second past that (a
    paused VM, an interpreter that ran no thread). Waiting on the network does not
    count: a thread blocked in a socket call lets this one run."""

    TICK_S, PAUSE_S = 0.05, 1.0

    def __init__(self) -> None:
        self.seconds = 0.0
        self._stop = threading.Event()

    def _tick(self) -> None:
        last = time.monotonic()
        while True:
            stopped = self._stop.wait(self.TICK_S)  # a pace, not a synchronisation
            now = time.monotonic()
            if now - last > self.TICK_S + self.PAUSE_S:
                self.seconds += now - last - self.TICK_S
            last = now
            if stopped:
                return

    def __enter__(self) -> Frozen:
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
