"""HTTP transfers that cannot hang: an overall deadline and a minimum-progress rule for every download
and Hub upload.

A socket timeout bounds one read, not a transfer: a server that accepts the connection and then
sends a byte every few seconds keeps it alive forever. Here a watchdog thread shuts the transfer's
sockets down once it runs past its deadline (``timeout``, $VITADAPTER_DOWNLOAD_TIMEOUT, default one
hour) or moves less than ``MIN_PROGRESS`` bytes within a stall window ($VITADAPTER_DOWNLOAD_STALL,
default 30 s), so that a blocked read returns at once and the transfer fails with a
``DownloadTimeout`` naming the URL (or Hub repo) and the time spent. Each read also times out after
a stall window. The watchdog owns every step from the first byte on: the name lookup runs on a
helper thread that is abandoned when a limit passes (the system resolver cannot be interrupted),
and each socket is watched from the moment it connects, so the TLS handshake is cut too.
"""
from __future__ import annotations

import http.client
import math
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar

import httpcore2
import httpx2
from huggingface_hub.utils import _http as hub_http
from huggingface_hub.utils import set_client_factory, tqdm

from .staging import write_atomically

TIMEOUT_ENV = "VITADAPTER_DOWNLOAD_TIMEOUT"
STALL_ENV = "VITADAPTER_DOWNLOAD_STALL"
DEFAULT_TIMEOUT = 3600.0
DEFAULT_STALL = 30.0
MIN_PROGRESS = 64 * 1024
_CHUNK = 1 << 20
T = TypeVar("T")


class DownloadError(OSError):
    """A download that failed; the message names the URL."""


class DownloadTimeout(DownloadError, TimeoutError):
    """A download stopped by its deadline or by its minimum-progress rule."""


@dataclass(frozen=True)
class Limits:
    timeout: float  # seconds for the whole transfer, connecting included
    stall: float  # seconds within which at least MIN_PROGRESS bytes must arrive


def download_limits(timeout: Optional[float] = None) -> Limits:
    """The limits of a download: ``timeout`` seconds overall (or $VITADAPTER_DOWNLOAD_TIMEOUT, default one
    hour) and the stall window of the minimum-progress rule ($VITADAPTER_DOWNLOAD_STALL, default 30 s)."""
    overall = _env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT) if timeout is None else _seconds(timeout, "timeout")
    return Limits(overall, _env_seconds(STALL_ENV, DEFAULT_STALL))


@contextmanager
def open_url(
    url: str, limits: Limits, headers: Mapping[str, str] = {}, private_headers: Mapping[str, str] = {}
) -> Iterator["Transfer"]:
    """GET ``url`` (redirects followed) under ``limits``; the ``Transfer`` holds every response's headers
    and streams the body. ``private_headers`` (credentials) are not sent on to redirect targets."""
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise ValueError(f"only http(s) URLs are downloaded, got {url!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "vitadapter", **headers})
    for name, value in private_headers.items():
        request.add_unredirected_header(name, value)
    with _Watchdog(f"download of {url}", limits) as watchdog:
        redirects = _Redirects()
        opener = urllib.request.build_opener(_WatchedHTTP(watchdog), _WatchedHTTPS(watchdog), redirects)
        try:
            response = opener.open(request, timeout=limits.stall)
        except (OSError, http.client.HTTPException) as e:
            watchdog.raise_timeout(e)
            raise
        with response:
            yield Transfer(url, response, [*redirects.hops, response.headers], watchdog)


@contextmanager
def bounded_hub_calls(what: str, limits: Limits) -> Iterator[None]:
    """Run huggingface_hub's HTTP calls of this block (e.g. an upload: its API calls and file transfers)
    under ``limits``, as one transfer named ``what``.

    huggingface_hub asks its client factory (``set_client_factory``) for a client, again after each
    connection error; for the block the factory makes clients whose connections the watchdog looks
    up, watches and counts. The factory is process-wide: other threads' Hub calls meanwhile are
    bounded too. Transfers huggingface_hub hands to other code (hf_xet) are not seen here.
    """
    # no public getter: the factory in force is read to put it back afterwards
    previous = hub_http._GLOBAL_CLIENT_FACTORY
    with _Watchdog(what, limits) as watchdog:
        set_client_factory(lambda: _bounded_client(watchdog))
        try:
            yield
        except Exception as e:  # once a limit cut the sockets, whatever huggingface_hub made of it
            watchdog.raise_timeout(e)
            raise
        finally:
            set_client_factory(previous)


def _bounded_client(watchdog: "_Watchdog") -> httpx2.Client:
    """A client like huggingface_hub's default one whose connections ``watchdog`` owns."""
    transport = httpx2.HTTPTransport()
    # httpx takes no network backend of its own; its connection pool does
    pool = transport._pool
    pool._network_backend = _WatchedBackend(watchdog, pool._network_backend)
    return httpx2.Client(
        transport=transport,
        event_hooks={"request": [hub_http.hf_request_event_hook]},
        follow_redirects=True,
        timeout=watchdog.limits.stall,
    )


class _WatchedBackend(httpcore2.NetworkBackend):
    """httpcore's network backend with the lookup under a watchdog, and its sockets watched and counted."""

    def __init__(self, watchdog: "_Watchdog", backend: httpcore2.NetworkBackend):
        self._watchdog, self._backend = watchdog, backend

    def connect_tcp(
        self, host: str, port: int, timeout: Optional[float] = None, local_address: Optional[str] = None,
        socket_options: Any = None,
    ) -> httpcore2.NetworkStream:
        def attempt(ip: str) -> httpcore2.NetworkStream:
            stream = self._backend.connect_tcp(ip, port, timeout, local_address, socket_options)
            self._watchdog.watch(stream.get_extra_info("socket"))
            return _CountedStream(stream, self._watchdog)

        try:
            return self._watchdog.connect(host, port, attempt, (httpcore2.ConnectError, httpcore2.ConnectTimeout))
        except socket.gaierror as e:  # as httpcore reports a failed lookup
            raise httpcore2.ConnectError(str(e)) from e

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        return self._backend.connect_unix_socket(*args, **kwargs)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _CountedStream(httpcore2.NetworkStream):
    """A connection whose bytes, both ways, count as the watchdog's progress."""

    def __init__(self, stream: httpcore2.NetworkStream, watchdog: "_Watchdog"):
        self._stream, self._watchdog = stream, watchdog

    def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
        data = self._stream.read(max_bytes, timeout)
        self._watchdog.transferred += len(data)
        return data

    def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
        self._stream.write(buffer, timeout)
        self._watchdog.transferred += len(buffer)

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: Optional[str] = None, timeout: Optional[float] = None) -> httpcore2.NetworkStream:
        return _CountedStream(self._stream.start_tls(ssl_context, server_hostname, timeout), self._watchdog)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class Transfer:
    """A GET whose headers are in: ``hops`` holds the headers of each response, redirects first."""

    def __init__(self, url: str, response: http.client.HTTPResponse, hops: list[Message], watchdog: "_Watchdog"):
        self.url, self.hops = url, hops
        self._response, self._watchdog = response, watchdog

    def save(self, target: Path, check: Optional[Callable[[Path], None]] = None) -> None:
        """Stream the body into ``target`` through a staging file, with a progress bar; a short body
        (fewer bytes than ``Content-Length``), or one that ``check(staging_path)`` raises on, never
        lands there."""
        length = self._response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        target.parent.mkdir(parents=True, exist_ok=True)

        def write(path: Path) -> None:
            with open(path, "wb") as out, tqdm(total=expected, unit="B", unit_scale=True, desc=target.name) as bar:
                for chunk in self._chunks():
                    out.write(chunk)
                    bar.update(len(chunk))
            if expected is not None and self._watchdog.transferred != expected:
                raise DownloadError(f"download of {self.url} incomplete: {self._watchdog.transferred} of {expected} bytes")
            if check is not None:
                check(path)

        write_atomically(target, write)

    def _chunks(self) -> Iterator[bytes]:
        while True:
            try:
                # read1 returns what one socket read brings, so progress is seen as it arrives
                chunk = self._response.read1(_CHUNK)
            except (OSError, http.client.HTTPException) as e:
                self._watchdog.raise_timeout(e)
                raise
            self._watchdog.raise_timeout(None)  # a cut socket reads as the end of the body
            if not chunk:
                return
            self._watchdog.transferred += len(chunk)
            yield chunk


class _Watchdog:
    """Shuts a transfer's sockets down when it runs past its deadline or makes too little progress.

    ``what`` names the transfer in errors ("download of URL", "upload to REPO")."""

    def __init__(self, what: str, limits: Limits):
        self.what, self.limits = what, limits
        self.transferred = 0  # bytes received (downloads) or sent and received (uploads)
        self.reason: Optional[str] = None
        self._looking_up: Optional[str] = None  # the host whose address is being looked up
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vitadapter-download-watchdog", daemon=True)

    def __enter__(self) -> "_Watchdog":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()
        for sock in self._sockets:
            sock.close()

    def connect(self, host: str, port: int, attempt: Callable[[str], T], failures: tuple[type[BaseException], ...]) -> T:
        """``attempt(ip)`` for each address of ``host`` in turn (looked up under the limits) until one
        does not raise one of ``failures``; its result is the connection."""
        error: Optional[BaseException] = None
        for *_, address in self._resolve(host, port):
            self.raise_timeout(None)
            try:
                return attempt(address[0])
            except failures as e:
                error = e
        raise error or OSError(f"{host} has no address")

    def watch(self, sock: socket.socket) -> None:
        """Let the limits cut ``sock`` from now on. A duplicate of its descriptor is kept: shutting that
        down shuts the connection down, even after TLS has taken ``sock``'s own descriptor over."""
        copy = sock.dup()
        with self._lock:
            self._sockets.append(copy)
            if self.reason:
                _shut(copy)

    def raise_timeout(self, error: Optional[BaseException]) -> None:
        """Raise a ``DownloadTimeout`` if a limit stopped the transfer (``error``: the network error seen)."""
        reason = self.reason
        if reason is None and _timed_out(error):
            reason = f"no data for {self.limits.stall:g} s (the stall window, ${STALL_ENV})"
        if reason is not None:
            during = f" while looking up the address of {self._looking_up}" if self._looking_up else ""
            raise DownloadTimeout(
                f"{self.what} stopped after {time.monotonic() - self.started:.1f} s{during}, "
                f"{self.transferred} bytes transferred: {reason}; retry when the connection is better, or raise the limit"
            ) from error

    def _resolve(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """``getaddrinfo`` on a helper thread, given up on (left to finish on its own) once a limit passes."""
        found: dict[str, Any] = {}

        def look_up() -> None:
            try:
                found["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as e:
                found["error"] = e
            with self._wake:
                self._wake.notify_all()

        self._looking_up = host
        threading.Thread(target=look_up, name="vitadapter-resolver", daemon=True).start()
        with self._wake:
            self._wake.wait_for(lambda: found or self.reason)
        if not found:
            self.raise_timeout(None)
        self._looking_up = None
        if "error" in found:
            raise found["error"]
        return found["addresses"]

    def _watch(self) -> None:
        limits = self.limits
        tick = min(max(min(limits.timeout, limits.stall) / 20, 0.01), 0.5)
        mark_time, mark_bytes = self.started, 0
        while not self._done.wait(tick):
            now = time.monotonic()
            if now - self.started >= limits.timeout:
                return self._cut(f"over the {limits.timeout:g} s limit for the whole transfer (timeout= or ${TIMEOUT_ENV})")
            if now - mark_time >= limits.stall:
                if self.transferred - mark_bytes < MIN_PROGRESS:
                    return self._cut(
                        f"less than {MIN_PROGRESS // 1024} KiB moved in {limits.stall:g} s "
                        f"(the minimum-progress rule; the window is ${STALL_ENV})"
                    )
                mark_time, mark_bytes = now, self.transferred

    def _cut(self, reason: str) -> None:
        with self._lock:
            self.reason = reason
            for sock in self._sockets:
                _shut(sock)
            self._wake.notify_all()


class _Redirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, keeping each redirect response's headers (the Hub puts a file's metadata on
    its redirect to the storage host) and refusing to leave http(s)."""

    def __init__(self) -> None:
        self.hops: list[Message] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        if urllib.parse.urlparse(newurl).scheme not in ("http", "https"):
            raise DownloadError(f"{req.full_url} redirects to {newurl}, which is not an http(s) URL")
        self.hops.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Watched:
    """urllib's HTTP(S) handler whose connections are watched by a ``_Watchdog``."""

    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self.watchdog = watchdog

    def do_open(self, http_class, req, **kwargs):  # noqa: ANN001 (urllib's signature)
        def connection(*args: Any, **kw: Any) -> http.client.HTTPConnection:
            made = http_class(*args, **kw)
            # http.client opens every socket here, TLS wraps it afterwards: the watchdog takes over
            # the lookup and watches the socket before the handshake
            made._create_connection = self._open
            return made

        return super().do_open(connection, req, **kwargs)

    def _open(self, address: tuple[str, int], timeout: Any = None, source_address: Any = None) -> socket.socket:
        def attempt(ip: str) -> socket.socket:
            sock = socket.create_connection((ip, address[1]), timeout, source_address)
            self.watchdog.watch(sock)
            return sock

        return self.watchdog.connect(address[0], address[1], attempt, (OSError,))


class _WatchedHTTP(_Watched, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPS(_Watched, urllib.request.HTTPSHandler):
    pass


def _shut(sock: socket.socket) -> None:
    # the plain socket's shutdown also for TLS sockets: it acts on the descriptor, which a blocked
    # read in another thread is waiting on, and leaves the TLS object alone
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def _timed_out(error: Optional[BaseException]) -> bool:
    """A socket timeout, also as urllib wraps it (``URLError(reason=timeout)``) or httpx reports it."""
    return isinstance(error, (TimeoutError, httpx2.TimeoutException)) or isinstance(getattr(error, "reason", None), TimeoutError)


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _env_seconds(variable: str, default: float) -> float:
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        return _seconds(float(text), f"${variable}")
    except ValueError:
        raise ValueError(f"${variable} must be a positive number of seconds, got {text!r}") from None
