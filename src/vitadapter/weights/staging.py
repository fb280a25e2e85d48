"""Every file vitadapter writes goes through here, so that an interrupted run (killed, disk full)
leaves nothing half-written, no user file replaced by a partial one, nothing other users cannot read,
and no debris that outlives the next run.

A file or folder is built under a staging name beside its destination, flushed to disk and renamed
into place (``os.replace``): the destination holds either its old content or the whole new one. A
destination that is a symbolic link is replaced by the new file; what the link points to is never
written. Staging names carry a tag of this host and the id of the writing process: a later run
removes the leftovers of processes that no longer run (killed, or the machine rebooted) and leaves
a write still in progress alone, even in a folder other hosts share.

Also here: refusing outputs that would replace an input of the same run, appending to a log without
leaving a partial line, a lock that keeps two runs out of one folder, and reading a folder that
another process may be re-saving.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import stat
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

T = TypeVar("T")

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_STAGING_NAME = re.compile(r"^\..+\.([0-9a-f]{8})-([0-9]{1,10})-[0-9a-f]{8}\.tmp$")


def staging_path(target: Path) -> Path:
    """A fresh name beside ``target`` to build it under; stale staging entries there are removed first."""
    remove_stale(target.parent)
    return target.with_name(f".{target.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def remove_stale(folder: Path) -> None:
    """Remove the staging files and folders in ``folder`` whose writer, a process of this host, is gone."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        match = _STAGING_NAME.match(entry.name)
        if not match or match[1] != _HOST or _running(int(match[2])):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Build ``path`` with ``write(staging_file)`` and rename it into place.

    The file ends up with the mode any new file gets here (0666 less the umask), whatever ``write``
    did: safetensors' writer, for one, replaces the file with a private 0600 one.
    """
    staging = staging_path(path)
    try:
        with open(staging, "xb"):
            pass
        mode = stat.S_IMODE(os.stat(staging).st_mode)
        write(staging)
        os.chmod(staging, mode)
        _publish(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_with_companions(path: Path, write: Callable[[Path], Any]) -> None:
    """As ``write_atomically``, for a writer that may add files named after ``path`` beside it (an
    ONNX file's external ``PATH.data``): ``write(folder / path.name)`` builds them in a staging
    folder; each is renamed into place, ``path`` last, so it never refers to data not there yet."""
    with staging_folder(path) as folder:
        write(folder / path.name)
        for built in sorted(folder.iterdir(), key=lambda p: p.name == path.name):
            _publish(built, path.with_name(built.name))


def save_image(image: Any, path: Path) -> None:
    """Write a Pillow image to ``path`` atomically, in the format its extension names."""
    from PIL import Image  # Pillow is needed by the commands that write pictures only

    Image.init()
    image_format = Image.EXTENSION.get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"{path}: Pillow cannot write '{path.suffix}' files; name a .png (or .jpg, .webp) file")
    write_atomically(path, lambda staging: image.save(staging, format=image_format))


def _publish(staging: Path, path: Path) -> None:
    """Flush ``staging`` to disk, rename it to ``path`` and flush the rename: after a crash ``path``
    holds the old or the new content, never an empty or partial file."""
    fd = os.open(staging, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(staging, path)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    if os.name == "nt":  # folders cannot be opened there, and renames are journaled by NTFS
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path: Path, line: str) -> None:
    """Append ``line`` and a newline to ``path`` in one write; a write that fails (disk full) is
    undone, so the file never ends in a partial line."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, data) != len(data):
                raise OSError(f"{path}: short write (is the disk full?)")
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


# ---- outputs that are inputs ---------------------------------------------------------------------


def inputs_in_the_way(outputs: Iterable[Path], inputs: Iterable[Path]) -> list[tuple[Path, Path]]:
    """(output, input) for each output that is one of ``inputs``: the same file (device and inode,
    so through any path, link or hard link), which writing the output would replace."""
    files = {}
    for source in inputs:
        try:
            info = os.stat(source)
        except OSError:
            continue
        files[(info.st_dev, info.st_ino)] = source
    clashes = []
    for output in outputs:
        try:
            info = os.stat(output)
        except OSError:  # not there yet (or a dangling link, which writing replaces): no input is lost
            continue
        if (info.st_dev, info.st_ino) in files:
            clashes.append((output, files[(info.st_dev, info.st_ino)]))
    return clashes


def check_destination(path: Path, what: str) -> None:
    """Refuse, before any work, a file destination that cannot be written as the user meant: a
    folder, a symbolic link (writing would either change the file it points to or cut the link), or
    one in a folder that does not exist. ``what`` names the option in the message."""
    if path.is_symlink():
        raise ValueError(f"{what} {path} is a symbolic link (to {os.readlink(path)}): name the file itself, "
                         "or remove the link first")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder: name the file to write")
    if not path.parent.is_dir():
        raise ValueError(f"{what} {path}: the folder {path.parent} does not exist")


@contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A new empty folder beside ``target`` to build it in; it is removed on every way out, so the
    caller renames it to ``target`` inside the ``with`` block to keep it."""
    folder = staging_path(target)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    if os.name == "nt":
        # os.kill(pid, 0) would terminate the process on Windows: keep its leftovers instead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:  # no process can have that id
        return False
    return True


# ---- one writer per folder ------------------------------------------------------------------------


class FolderBusy(OSError):
    """Another process holds the lock of the folder."""


@contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold the lock of the existing ``folder`` for the ``with`` block, or raise ``FolderBusy``. The
    lock is the folder's own (``flock`` on it, no lock file to leave behind): the operating system
    releases it when its holder exits, killed or not, so a crash leaves no stale lock. Windows
    cannot lock a folder: there the block runs unlocked."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise FolderBusy(f"{folder} is in use by another {what}: wait for it to end, or pick another folder") from e
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ---- reading what another process may be re-writing -----------------------------------------------


def new_save_id() -> str:
    """A fresh id that every file of one save carries, so that a reader can tell the files of one
    save from those of another (never reused: an id seen twice means no save came between)."""
    return uuid.uuid4().hex


def read_consistently(read: Callable[[], Optional[T]], failure: str, tries: int = 5) -> T:
    """``read()`` until it returns something other than ``None`` (``None``: the files it read came
    from different saves, a writer may be at work), waiting a little longer each time; after
    ``tries``, ``OSError(failure)``."""
    for attempt in range(tries):
        value = read()
        if value is not None:
            return value
        time.sleep(0.05 * 2**attempt)
    raise OSError(failure)
