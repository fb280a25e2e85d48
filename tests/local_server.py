"""A small HTTP server on 127.0.0.1 that stands in for the Hugging Face Hub and GitHub releases.

It serves bytes from memory on a daemon thread, shuts down when its ``with`` block ends or after
``lifetime`` seconds, whichever comes first, and records every request. Hub file URLs
(``/{org}/{name}/resolve/{revision}/{file}``) carry the headers huggingface_hub's download needs
(``ETag``, ``X-Repo-Commit``, ``Content-Length``); missing Hub files answer 404 with the Hub's
``X-Error-Code``.
"""
from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Mapping, Optional

HUB_FILE = re.compile(r"^/[^/]+/[^/]+/resolve/[^/]+/.+$")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class LocalServer:
    """``files``: URL path -> content. ``redirects``: path -> path it redirects to (GitHub release
    downloads redirect to a storage host). ``truncate``: paths whose GET sends half the bytes and closes."""

    def __init__(
        self,
        files: Mapping[str, bytes],
        redirects: Optional[Mapping[str, str]] = None,
        truncate: Iterable[str] = (),
        lifetime: float = 60.0,
    ):
        self.files = dict(files)
        self.redirects = dict(redirects or {})
        self.truncate = set(truncate)
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._deadline = threading.Timer(lifetime, self._server.shutdown)
        self._deadline.daemon = True

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "LocalServer":
        self._thread.start()
        self._deadline.start()
        return self

    def __exit__(self, *exc) -> None:
        self._deadline.cancel()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def _handler(server: LocalServer) -> type:
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # a stuck client cannot hold a server thread for long

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            server.requests.append((self.command, self.path))
            if self.path in server.redirects:
                self.send_response(302)
                self.send_header("Location", server.redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            content = server.files.get(self.path)
            if content is None:
                self.send_response(404)
                if HUB_FILE.match(self.path):
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(content)))
            if HUB_FILE.match(self.path):
                self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            if body:
                self.wfile.write(content[: len(content) // 2] if self.path in server.truncate else content)
                self.close_connection = self.path in server.truncate

        def log_message(self, *args) -> None:  # requests are recorded, not printed
            pass

    return Handler
