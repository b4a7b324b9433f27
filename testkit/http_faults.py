"""A real HTTP server on 127.0.0.1 that serves files and injects faults per file (tests, benchmarks).

It stands in for the HPA image server: `FaultServer(files, faults)` serves `files`
(`{"/10005/921_B9_1_red.jpg": bytes}`) from a `ThreadingHTTPServer` in a background thread,
speaking HTTP/1.1 with keep-alive like a real server. A path's fault plan is a list of actions
used one per request (then plain answers), or one action ending in `*` used for every request:

    ok            200 with the file (404 when the path has no file)
    500, 503, ... that status, an empty body
    429:S         429 Too Many Requests with `Retry-After: S`
    404           404 Not Found
    stall:S       wait S seconds before answering (the client's read timeout fires first)
    truncate      200, the full Content-Length, half the body, then the connection is closed
    garbage       200 with bytes that are no image (an HTML error page)
    reset         close the connection without an answer

`latency` adds a fixed delay to every request (a far-away server). Accepted sockets are set
to TCP_NODELAY, as production servers do (see `Handler.setup`). Every request is logged as
`(monotonic time, path, action)` in `log`, so a test can say which files were asked for.
"""
from __future__ import annotations

import http.server
import socket
import threading
import time
from typing import Iterable, Mapping

GARBAGE = b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>\n"


class FaultServer:
    def __init__(self, files: Mapping[str, bytes], faults: Mapping[str, Iterable[str] | str] | None = None,
                 latency: float = 0.0):
        self.files = dict(files)
        self.latency = latency
        self.log: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self._plans: dict[str, list[str] | str] = {}
        for path, plan in (faults or {}).items():
            self.set_fault(path, plan)
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def set_fault(self, path: str, plan: Iterable[str] | str | None) -> None:
        """Replace the fault plan of one path (None: plain answers from now on)."""
        with self._lock:
            if plan is None:
                self._plans.pop(path, None)
            elif isinstance(plan, str):
                self._plans[path] = plan if plan.endswith("*") else [plan]
            else:
                self._plans[path] = list(plan)

    def _next_action(self, path: str) -> str:
        with self._lock:
            plan = self._plans.get(path)
            if isinstance(plan, str):
                action = plan[:-1]
            elif plan:
                action = plan.pop(0)
            else:
                action = "ok"
            self.log.append((time.monotonic(), path, action))
            return action

    def requests_for(self, path: str) -> int:
        with self._lock:
            return sum(1 for _, p, _ in self.log if p == path)

    def paths_requested(self) -> set[str]:
        with self._lock:
            return {p for _, p, _ in self.log}

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultServer":
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def setup(self):
                # http.server sends headers and body in two writes; on a kept-alive connection
                # Nagle then holds the second for the client's delayed ACK (~40 ms a request on
                # Linux). Production servers set TCP_NODELAY, so does this one.
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                super().setup()

            def _send(self, code: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
                      cut: int | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - the stdlib's name
                path = self.path.split("?", 1)[0]
                action = server._next_action(path)
                if server.latency:
                    time.sleep(server.latency)
                body = server.files.get(path)
                try:
                    if action.startswith("stall:"):
                        time.sleep(float(action.split(":", 1)[1]))
                        action = "ok"
                    if action == "ok":
                        if body is None:
                            self._send(404, b"not found\n")
                        else:
                            self._send(200, body, {"Content-Type": "application/octet-stream"})
                    elif action == "truncate":
                        data = body or GARBAGE
                        self._send(200, data, cut=len(data) // 2)
                    elif action == "garbage":
                        self._send(200, GARBAGE, {"Content-Type": "text/html"})
                    elif action == "reset":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                    elif action.startswith("429"):
                        wait = action.split(":", 1)[1] if ":" in action else "1"
                        self._send(429, b"slow down\n", {"Retry-After": wait})
                    elif action.isdigit():
                        self._send(int(action), b"")
                    else:
                        raise ValueError(f"unknown fault action {action!r}")
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass  # the client gave up (a stall past its timeout)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def synthetic_channel(image_id: str, color: str, size: int = 96, fmt: str = "jpg") -> bytes:
    """A small, deterministic channel file as the HPA website serves it: a greyscale JPEG
    (`jpg`) or a gzipped 16-bit TIFF (`tif`). Its pixels depend on the ID and colour only."""
    import gzip
    import io
    import zlib

    import numpy as np

    seed = zlib.crc32(f"{image_id}_{color}".encode())
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    blobs = np.zeros((size, size), np.float64)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 12, size / 5)]
        blobs += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    img = np.clip(blobs / max(1e-9, blobs.max()), 0, 1)
    if fmt == "jpg":
        import cv2

        ok, buf = cv2.imencode(".jpg", (img * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        return buf.tobytes()
    if fmt == "tif":
        import tifffile

        out = io.BytesIO()
        tifffile.imwrite(out, (img * 65535).astype(np.uint16))
        return gzip.compress(out.getvalue(), mtime=0)
    raise ValueError(f"fmt must be 'jpg' or 'tif', got {fmt!r}")
