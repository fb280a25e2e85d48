"""Writing files and folders so that an interrupted run leaves nothing half-written, nothing other
users cannot read, and no debris that outlives the next run.

A file or folder is built under a staging name beside its destination and renamed into place.
Staging names carry a tag of this host and the id of the writing process: a later run removes the
leftovers of processes that no longer run (killed, or the machine rebooted) and leaves a write still
in progress alone, even in a folder other hosts share.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

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
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


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
