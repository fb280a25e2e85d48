"""A small HTTP server on 127.0.0.1 that stands in for the Hugging Face Hub and GitHub releases.

It serves bytes from memory on a daemon thread, shuts down when its ``with`` block ends or after
``lifetime`` seconds, whichever comes first, and records every request. Hub file URLs
(``/{org}/{name}/resolve/{revision}/{file}``) carry the headers huggingface_hub's download needs
(``ETag``, ``X-Repo-Commit``, ``Content-Length``), at revision ``main`` and at its commit ``COMMIT``;
missing Hub files answer 404 with the Hub's ``X-Error-Code``. Unlucky networks on demand: paths that
are never answered, paths whose whole answer (status line and headers included) trickles out one
byte at a time, files that change between requests, and bodies that are not the file their headers
describe (a cut file, a captive portal's page).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Mapping, Optional

HUB_FILE = re.compile(r"^/[^/]+/[^/]+/resolve/[^/]+/.+$")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class LocalServer:
    """``files``: URL path -> content. ``redirects``: path -> path it redirects to (GitHub release
    downloads redirect to a storage host). ``truncate``: paths whose GET sends half the bytes and closes.
    ``stall``: paths whose requests are read and never answered. ``trickle``: paths whose answer is
    sent one byte every ``trickle_interval`` seconds. ``changes``: path -> contents it serves in turn
    (honestly, the last one from then on). ``lies``: path -> bodies sent in turn, each in place of
    ``files[path]`` under that file's headers except ``Content-Length``."""

    def __init__(
        self,
        files: Mapping[str, bytes],
        redirects: Optional[Mapping[str, str]] = None,
        truncate: Iterable[str] = (),
        lifetime: float = 60.0,
        stall: Iterable[str] = (),
        trickle: Iterable[str] = (),
        trickle_interval: float = 0.2,
        changes: Optional[Mapping[str, list]] = None,
        lies: Optional[Mapping[str, list]] = None,
    ):
        self.files = dict(files)
        self.changes = {path: list(contents) for path, contents in (changes or {}).items()}
        self.lies = {path: list(bodies) for path, bodies in (lies or {}).items()}
        self.redirects = dict(redirects or {})
        self.truncate = set(truncate)
        self.stall, self.trickle, self.trickle_interval = set(stall), set(trickle), trickle_interval
        self.requests: list[tuple[str, str]] = []
        self.closing = threading.Event()  # set on exit, so stalled and trickling answers end
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
        self.closing.set()
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
            path = self.path.replace(f"/resolve/{COMMIT}/", "/resolve/main/")
            if server.changes.get(path):
                server.files[path] = server.changes[path].pop(0) if len(server.changes[path]) > 1 else server.changes[path][0]
            if server.lies.get(path) and body:
                content = server.files[path]
                sent = server.lies[path].pop(0)
                self.send_response(200)
                for name, value in {**_content_headers(path, content), "Content-Length": str(len(sent))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(sent)
                return
            if path in server.stall:
                server.closing.wait()
                self.close_connection = True
                return
            if path in server.trickle:
                content = server.files[path]
                head = "".join(f"{k}: {v}\r\n" for k, v in _content_headers(path, content).items())
                answer = f"HTTP/1.1 200 OK\r\n{head}\r\n".encode() + (content if body else b"")
                for i in range(len(answer)):
                    if server.closing.is_set():
                        break
                    try:
                        self.wfile.write(answer[i : i + 1])
                        self.wfile.flush()
                    except OSError:  # the client gave up
                        break
                    time.sleep(server.trickle_interval)
                self.close_connection = True
                return
            if path in server.redirects:
                self.send_response(302)
                self.send_header("Location", server.redirects[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            content = server.files.get(path)
            if content is None:
                self.send_response(404)
                if HUB_FILE.match(path):
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            for name, value in _content_headers(path, content).items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                try:
                    self.wfile.write(content[: len(content) // 2] if path in server.truncate else content)
                except ConnectionError:  # a client that had its cached copy read the headers only
                    self.close_connection = True
                    return
                self.close_connection = path in server.truncate

        def log_message(self, *args) -> None:  # requests are recorded, not printed
            pass

    return Handler


def _content_headers(path: str, content: bytes) -> dict[str, str]:
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(content))}
    if HUB_FILE.match(path):
        headers["ETag"] = f'"{hashlib.sha256(content).hexdigest()}"'
        headers["X-Repo-Commit"] = COMMIT
    return headers


class HubUploads:
    """A Hub that takes commits, on 127.0.0.1: repo creation, the pre-upload query (every file is sent
    inline, as the Hub does for small ones) and the commit, whose files it records in ``committed``
    (path in repo -> bytes), with the creation request in ``created`` and the credentials seen. ``stall``: API calls ("create", "preupload", "commit") that are read and
    never answered. Used as ``HF_ENDPOINT``; shuts down when its ``with`` block ends."""

    def __init__(self, stall: Iterable[str] = ()):
        self.stall = set(stall)
        self.committed: dict[str, bytes] = {}
        self.calls: list[str] = []
        self.created: dict = {}  # the repo creation request
        self.authorization: set[str] = set()  # the Authorization headers seen
        self.closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _upload_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubUploads":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def _upload_handler(hub: HubUploads) -> type:
    calls = [("create", re.compile(r"^/api/repos/create$")),
             ("preupload", re.compile(r"^/api/models/[^/]+/[^/]+/preupload/[^/]+")),
             ("commit", re.compile(r"^/api/models/[^/]+/[^/]+/commit/[^/]+"))]

    class Handler(BaseHTTPRequestHandler):
        timeout = 10

        def do_POST(self) -> None:
            call = next((name for name, pattern in calls if pattern.match(self.path)), None)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            hub.calls.append(call or self.path)
            if self.headers.get("Authorization"):
                hub.authorization.add(self.headers["Authorization"])
            if call in hub.stall:
                hub.closing.wait()
                self.close_connection = True
                return
            if call == "create":
                request = hub.created = json.loads(body)
                answer = {"url": f"{hub.url}/{request.get('organization')}/{request['name']}"}
            elif call == "preupload":
                files = json.loads(body)["files"]
                answer = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            elif call == "commit":
                for line in body.splitlines():
                    entry = json.loads(line)
                    if entry["key"] == "file":
                        hub.committed[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                repo = self.path.split("/")[3:5]
                answer = {"commitUrl": f"{hub.url}/{'/'.join(repo)}/commit/{COMMIT}", "commitOid": COMMIT}
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    return Handler


def hub_endpoint(monkeypatch, url: str) -> None:
    """Point this process's huggingface_hub at ``url`` for a test (it reads HF_ENDPOINT when imported)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


class SilentTLS:
    """A TCP server on 127.0.0.1 that accepts connections and never completes a TLS handshake: it says
    nothing, or with ``trickle`` sends the start of a TLS record (one that announces 16 KiB) one byte
    every ``interval`` seconds and nothing more, so each read gets something and none gets enough."""

    def __init__(self, trickle: bool = False, interval: float = 0.2):
        self.trickle, self.interval = trickle, interval
        self.closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = "https://127.0.0.1:%d" % self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> "SilentTLS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self._listener.close()
        self._thread.join(timeout=10)

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        with conn:
            record = b"\x16\x03\x03\x40\x00" + bytes(1 << 14) if self.trickle else b""
            for i in range(len(record)):
                if self.closing.wait(self.interval):
                    return
                try:
                    conn.sendall(record[i : i + 1])
                except OSError:  # the client gave up
                    return
            self.closing.wait()
