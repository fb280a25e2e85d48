"""HTTP downloads that cannot hang: an overall deadline and a minimum-progress rule for every transfer.

A socket timeout bounds one read, not a transfer: a server that accepts the connection and then
sends a byte every few seconds keeps it alive forever. Here a watchdog thread shuts the transfer's
sockets down once it runs past its deadline (``timeout``, $VITADAPTER_DOWNLOAD_TIMEOUT, default one
hour) or receives less than ``MIN_PROGRESS`` bytes within a stall window ($VITADAPTER_DOWNLOAD_STALL,
default 30 s), so that a blocked read returns at once and the download fails with a
``DownloadTimeout`` naming the URL and the time spent. Each read also times out after a stall
window. Not covered: name resolution and the TLS handshake, which only the per-read timeout and the
system resolver's own limits bound.
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
from typing import Any, Callable, Iterator, Mapping, Optional

from huggingface_hub.utils import tqdm

from .staging import write_atomically

TIMEOUT_ENV = "VITADAPTER_DOWNLOAD_TIMEOUT"
STALL_ENV = "VITADAPTER_DOWNLOAD_STALL"
DEFAULT_TIMEOUT = 3600.0
DEFAULT_STALL = 30.0
MIN_PROGRESS = 64 * 1024
_CHUNK = 1 << 20


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
    with _Watchdog(url, limits) as watchdog:
        redirects = _Redirects()
        opener = urllib.request.build_opener(_WatchedHTTP(watchdog), _WatchedHTTPS(watchdog), redirects)
        try:
            response = opener.open(request, timeout=limits.stall)
        except (OSError, http.client.HTTPException) as e:
            watchdog.raise_timeout(e)
            raise
        with response:
            yield Transfer(url, response, [*redirects.hops, response.headers], watchdog)


class Transfer:
    """A GET whose headers are in: ``hops`` holds the headers of each response, redirects first."""

    def __init__(self, url: str, response: http.client.HTTPResponse, hops: list[Message], watchdog: "_Watchdog"):
        self.url, self.hops = url, hops
        self._response, self._watchdog = response, watchdog

    def save(self, target: Path) -> None:
        """Stream the body into ``target`` through a staging file, with a progress bar; a short body
        (fewer bytes than ``Content-Length``) never lands there."""
        length = self._response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        target.parent.mkdir(parents=True, exist_ok=True)

        def write(path: Path) -> None:
            with open(path, "wb") as out, tqdm(total=expected, unit="B", unit_scale=True, desc=target.name) as bar:
                for chunk in self._chunks():
                    out.write(chunk)
                    bar.update(len(chunk))
            if expected is not None and self._watchdog.received != expected:
                raise DownloadError(f"download of {self.url} incomplete: {self._watchdog.received} of {expected} bytes")

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
            self._watchdog.received += len(chunk)
            yield chunk


class _Watchdog:
    """Shuts a transfer's sockets down when it runs past its deadline or makes too little progress."""

    def __init__(self, url: str, limits: Limits):
        self.url, self.limits = url, limits
        self.received = 0
        self.reason: Optional[str] = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="vitadapter-download-watchdog", daemon=True)

    def __enter__(self) -> "_Watchdog":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()

    def connections(self, connection_class: Callable[..., http.client.HTTPConnection]) -> Callable[..., Any]:
        """``connection_class`` whose connections' sockets this watchdog can shut down."""

        def create(*args: Any, **kwargs: Any) -> http.client.HTTPConnection:
            connection = connection_class(*args, **kwargs)
            connect = connection.connect

            def watched_connect() -> None:
                connect()
                with self._lock:
                    self._sockets.append(connection.sock)
                    if self.reason:
                        _shut(connection.sock)

            connection.connect = watched_connect
            return connection

        return create

    def raise_timeout(self, error: Optional[BaseException]) -> None:
        """Raise a ``DownloadTimeout`` if a limit stopped the transfer (``error``: the network error seen)."""
        reason = self.reason
        if reason is None and _timed_out(error):
            reason = f"no data for {self.limits.stall:g} s (the stall window, ${STALL_ENV})"
        if reason is not None:
            raise DownloadTimeout(
                f"download of {self.url} stopped after {time.monotonic() - self.started:.1f} s, "
                f"{self.received} bytes in: {reason}; retry when the connection is better, or raise the limit"
            ) from error

    def _watch(self) -> None:
        limits = self.limits
        tick = min(max(min(limits.timeout, limits.stall) / 20, 0.01), 0.5)
        mark_time, mark_bytes = self.started, 0
        while not self._done.wait(tick):
            now = time.monotonic()
            if now - self.started >= limits.timeout:
                return self._cut(f"over the {limits.timeout:g} s limit for the whole download (timeout= or ${TIMEOUT_ENV})")
            if now - mark_time >= limits.stall:
                if self.received - mark_bytes < MIN_PROGRESS:
                    return self._cut(
                        f"less than {MIN_PROGRESS // 1024} KiB arrived in {limits.stall:g} s "
                        f"(the minimum-progress rule; the window is ${STALL_ENV})"
                    )
                mark_time, mark_bytes = now, self.received

    def _cut(self, reason: str) -> None:
        with self._lock:
            self.reason = reason
            for sock in self._sockets:
                _shut(sock)


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
        return super().do_open(self.watchdog.connections(http_class), req, **kwargs)


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
    """A socket timeout, also as urllib wraps it (``URLError(reason=timeout)``)."""
    return isinstance(error, TimeoutError) or isinstance(getattr(error, "reason", None), TimeoutError)


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
