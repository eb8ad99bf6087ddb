"""One run per workdir, and no leftovers of killed writes in it.

:func:`lock` holds ``<workdir>/.lock`` for a whole run: an exclusive ``fcntl.flock`` on that file, taken
without waiting, so a second run on the same workdir fails at once with :class:`WorkdirBusyError` naming the
holder instead of, say, letting its Orbax start-up delete the first run's in-flight checkpoint. The file
holds the holder's ``{"pid", "host", "started"}``; the kernel drops a flock when its process dies, so a file
that is still filled but no longer locked was left by a dead run and is taken over with a warning. A clean
release empties the file (the file itself stays: unlinking it would let two runs lock different inodes).

flock is reliable on local filesystems; on NFS and similar it may not exclude other hosts, which is why only
process 0 of a multi-host run takes the lock (``enabled``) and why a workdir should not be shared between
machines outside one run.

:func:`remove_stale_temporaries` deletes what killed atomic writes leave (hidden ``.tmp-<8 hex>.<name>``
siblings, see :func:`models.storage.temporary_path`); call it while holding the lock, when no writer of this run
can be mid-write.

An object store has neither locks nor renames. A workdir in a Cloud Storage bucket (``gs://...``) is held with a
lease instead (:mod:`experiments.runtime.lease`): an object created only if absent, renewed by a heartbeat, taken
over with a warning once its holder has not renewed it for the holder's timeout, released at the end; the same
:class:`WorkdirBusyError` refuses a second run, and a run that loses its lease stops with
:class:`WorkdirLostError`. (``s3://`` and ``az://`` workdirs are not locked: one run per workdir is then the
user's to keep.) A bucket has no temporaries to clean, since writes there upload whole objects and publish
directories with a completion marker (:mod:`models.storage`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from absl import logging

from experiments.runtime import lease
from models import storage
from models.storage import TEMPORARY_PATTERN

# What atomic writers named their temporaries before (`.<name>.tmp-<8 chars of mkdtemp>`, `.<name>.old-<8 hex>`).
LEGACY_TEMPORARY_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[a-z0-9_]{8}$")

LOCK_FILE = ".lock"

# Workdirs this process holds (absolute path -> nesting depth), so that a job run inside a runner that
# already locked the same workdir does not lock itself out.
_held: dict[str, int] = {}


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir's lock; the message names it (pid, host, start time)."""


class WorkdirLostError(RuntimeError):
    """This run lost the lease of its bucket workdir (taken over by another run, or not renewable for longer than
    its timeout) and stopped."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds (or held) a workdir lock, as written in its lock file."""

    pid: int | None
    host: str | None
    started: str | None

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"


def _read_holder(fd: int) -> Holder | None:
    """The holder recorded in the open lock file (None when empty; unknown fields when unparseable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        record = json.loads(text)
        return Holder(record.get("pid"), record.get("host"), record.get("started"))
    except (json.JSONDecodeError, AttributeError):
        return Holder(None, None, f"unknown (unreadable lock file: {text[:60]!r})")


def _write(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode())
    os.fsync(fd)


def _acquire(lock_path: str) -> int:
    """Locks ``lock_path`` without waiting and records this process in it; returns the open descriptor."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        who = holder or "a process that is still starting up"
        raise WorkdirBusyError(f"{os.path.dirname(lock_path)} is in use by {who} (lock file {lock_path}): "
                               "wait for that run to finish or stop it, or use another workdir") from None
    except BaseException:
        os.close(fd)
        raise
    previous = _read_holder(fd)
    if previous is not None:
        logging.warning("taking over the lock of %s: it was left by %s, which no longer holds it (killed?)",
                        os.path.dirname(lock_path), previous)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    _write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}))
    return fd


@contextlib.contextmanager
def lock(path: str | os.PathLike, *, enabled: bool = True) -> Iterator[None]:
    """Holds the exclusive lock of workdir ``path`` (created if missing; a lease in a ``gs://`` bucket) for the
    ``with`` block.

    Raises :class:`WorkdirBusyError` at once if another live process holds it. ``enabled=False`` does nothing
    (the caller passes ``jax.process_index() == 0``, so one process of a multi-host run takes it). Re-entrant
    within a process: a nested ``lock`` of a workdir this process holds is a no-op.
    """
    if not enabled:
        yield
        return
    if storage.is_remote(path):
        with _lease(storage.absolute(path)):
            yield
        return
    os.makedirs(path, exist_ok=True)
    key = os.path.realpath(path)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = _acquire(os.path.join(key, LOCK_FILE))
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        _write(fd, "")  # released cleanly: the next run takes it over without a warning
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def _lease(url: str) -> Iterator[None]:
    """:func:`lock` of a workdir in a bucket (see the module docstring)."""
    if url in _held or not url.startswith("gs://"):
        if url not in _held:
            logging.warning("%s is not locked: leases need Cloud Storage's generation preconditions (gs://)", url)
        _held[url] = _held.get(url, 0) + 1
        try:
            yield
        finally:
            _held[url] -= 1
            if not _held[url]:
                del _held[url]
        return
    held = lease.Lease(f"{url}/{LOCK_FILE}")
    try:
        held.acquire()
    except lease.LeaseHeldError as e:
        raise WorkdirBusyError(str(e)) from None
    _held[url] = 1
    try:
        yield
    except KeyboardInterrupt:
        if held.lost:  # the heartbeat interrupted this thread
            raise WorkdirLostError(held.lost) from None
        raise
    finally:
        del _held[url]
        held.release()


@contextlib.contextmanager
def lock_for_run(path: str | os.PathLike) -> Iterator[None]:
    """:func:`lock` for every process of a run: process 0 takes it and tells the others whether it got it, so
    that a refused (or failed) multi-host run stops on every process at once, instead of leaving the others
    waiting at their first collective for a process 0 that is gone. Call it on every process."""
    from experiments.runtime import parallel

    with contextlib.ExitStack() as stack:
        problem, error = "", None
        if parallel.jax.process_index() == 0:
            try:
                stack.enter_context(lock(path))
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others have heard of it
                problem, error = f"{type(e).__name__}: {e}", e
        problem = parallel.process_0_text(problem)
        if error is not None:
            raise error
        if problem:
            kind, _, message = problem.partition(": ")
            raise (WorkdirBusyError if kind == WorkdirBusyError.__name__ else RuntimeError)(
                message if kind == WorkdirBusyError.__name__ else f"process 0 could not take {path}: {problem}")
        yield


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Removes the temporaries killed atomic writes left anywhere under workdir ``path``; returns their paths.

    Matches only the names the project's atomic writers use (:data:`models.storage.TEMPORARY_PATTERN`, and the
    older ``.<name>.tmp-<8 chars>`` form): ``.tmp-*`` entries are unfinished writes and are deleted. An
    ``.old-*`` entry is the previous version of a directory parked during a swap: deleted when the new
    version stands beside it, renamed back into place (with a warning) when the kill came between the two
    renames. Each action is logged with its size. Call it while holding :func:`lock`.
    """
    removed = []
    if storage.is_remote(path):
        return removed
    for dirpath, dirnames, filenames in os.walk(path):
        for name in sorted(dirnames + filenames):
            match = TEMPORARY_PATTERN.match(name) or LEGACY_TEMPORARY_PATTERN.match(name)
            if match is None:
                continue
            entry, final = Path(dirpath, name), Path(dirpath, match["name"])
            if name in dirnames:
                dirnames.remove(name)  # never walk into a temporary
            if match["kind"] == "old" and not final.exists():
                os.rename(entry, final)
                logging.warning("restored %s from %s: a replacement was killed between its two renames",
                                final, entry)
                continue
            size = _size(entry)
            _remove(entry)
            removed.append(str(entry))
            logging.warning("removed %s (%.1f MB), left by a killed write of %s", entry, size / 1e6, final)
    return removed
