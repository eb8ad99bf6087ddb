"""One path layer for everything a run reads and writes, on local disks and object stores alike.

Paths are strings: local paths, or URLs of an object store (``gs://bucket/dir``, ``s3://``, ``az://``). Every
file operation of the project goes through this module, which uses ``etils.epath`` (what Orbax itself uses; on
``gs://`` it needs the ``gcs`` extra, gcsfs) so that a workdir, a data folder or a model directory in a bucket
behaves like one on disk. Writers that need a real local file (safetensors, ``np.savez``, ONNX, matplotlib)
get one: :func:`atomic_file` and :func:`atomic_directory` yield a local temporary path and publish it when the
block exits; :func:`local_copy` gives readers that need a local file (tokenizers, onnxruntime) one.

Publication. On a local disk a directory is written beside its destination and renamed into place, so it
exists only when complete. Object stores have no rename: the files are uploaded into the destination and a
completion marker (:data:`COMPLETE_MARKER`) is written last, after every other file; :func:`is_complete` is what
readers (resume, ``models.load``, recipe skipping) check, and an unmarked remote directory is a killed upload,
never read and overwritten by the next writer. Local directories get the marker too (inside the temporary,
before the rename); a local directory without one (written before the marker existed) is complete by the rename.
A single file is atomic on both: a local rename, or one object upload, which a store shows whole or not at all.

Remote listings are not cached (``use_listings_cache=False``): the processes of a pod write into the same bucket
and each must see the others' files after a barrier.

Flaky stores. Every ``gs://`` request is retried on transient failures (429, 5xx, dropped connections, timeouts)
with bounded exponential backoff, logged and counted, and a failed upload is checked before it is redone
(:mod:`models.retries`, installed on import); a request still failing when the budget is spent raises
:class:`~models.retries.StoreUnavailableError` naming the object. Existence checks never take an outage for a
missing file.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from absl import logging
from etils import epath

from models import retries

REMOTE_PREFIXES = ("gs://", "s3://", "az://")
COMPLETE_MARKER = "_COMPLETE"  # written last into a finished directory (see the module docstring)

# Temporaries of local atomic writes: `.tmp-<8 hex>.<name>` beside the destination (hidden; the destination's
# suffix kept, so writers that append one, such as np.savez, leave the name alone). A directory being replaced
# is parked as `.old-<8 hex>.<name>` between the two renames of the swap.
TEMPORARY_PATTERN = re.compile(r"^\.(?P<kind>tmp|old)-[0-9a-f]{8}\.(?P<name>.+)$")

try:  # every process must see the files the others wrote: no stale directory listings
    import fsspec

    for _protocol in ("gcs", "gs", "s3", "az"):
        fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False
except ImportError:  # pragma: no cover - fsspec comes with etils[epath]
    pass
retries.install()  # before any gs:// filesystem is made


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-store URLs (``gs://``, ``s3://``, ``az://``)."""
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path`` (pathlib's interface on local disks and object stores)."""
    return epath.Path(os.fspath(path))


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute; a URL unchanged but for a trailing slash."""
    path = os.fspath(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def relative_to(path: str, base: str) -> str:
    """``path`` relative to ``base`` (``os.path.relpath`` for both kinds of path)."""
    return os.path.relpath(path, base) if not is_remote(path) else path[len(base.rstrip("/")) + 1:]


def exists(path: str | os.PathLike) -> bool:
    return as_path(path).exists() if is_remote(path) else os.path.exists(path)


def is_file(path: str | os.PathLike) -> bool:
    return as_path(path).is_file() if is_remote(path) else os.path.isfile(path)


def is_dir(path: str | os.PathLike) -> bool:
    return as_path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def makedirs(path: str | os.PathLike) -> None:
    """Creates directory ``path`` and its parents (on an object store directories are implicit: a no-op)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
    """The names in directory ``path``, sorted (``[]`` when it does not exist)."""
    p = as_path(path)
    if not p.is_dir():
        return []
    return sorted(child.name for child in p.iterdir())


def read_text(path: str | os.PathLike) -> str:
    return as_path(path).read_text(encoding="utf-8")


def read_bytes(path: str | os.PathLike) -> bytes:
    return as_path(path).read_bytes()


def size(path: str | os.PathLike) -> int:
    """Bytes in file ``path``."""
    return as_path(path).stat().length if is_remote(path) else os.path.getsize(path)


def size_and_mtime_ns(path: str | os.PathLike) -> tuple[int, int]:
    """File ``path``'s size and modification time in ns (an object's upload time, whole seconds, in a bucket:
    an object is rewritten, never changed in place)."""
    if is_remote(path):
        stat = as_path(path).stat()
        return stat.length, int(stat.mtime * 10 ** 9)
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def remove(path: str | os.PathLike) -> None:
    """Deletes file or directory tree ``path`` (nothing when it does not exist)."""
    p = as_path(path)
    if p.is_dir():
        p.rmtree()
    elif p.exists():
        p.unlink()


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Moves ``src`` (file or directory) to ``dst``: one rename on a disk; on a store a copy, then the delete."""
    if not is_remote(src) and not is_remote(dst):
        os.replace(src, dst)
        return
    s, d = as_path(src), as_path(dst)
    if s.is_dir():
        for child in s.iterdir():
            move(child, d / child.name)
        s.rmtree(missing_ok=True)
    else:
        d.write_bytes(s.read_bytes())
        s.unlink()


# ---------------------------------------------------------------------------------------------------- writing


def temporary_path(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh hidden sibling name for a local temporary of ``path`` (``kind`` "tmp") or its parked old
    version ("old"); matches :data:`TEMPORARY_PATTERN`."""
    path = Path(path)
    return path.parent / f".{kind}-{uuid.uuid4().hex[:8]}.{path.name}"


def _fsync_dir(path: Path) -> None:
    """Makes the renames inside directory ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _upload(local: Path, remote: epath.Path) -> None:
    """Copies local file or directory tree ``local`` to ``remote`` (one object per file)."""
    if local.is_dir():
        for child in sorted(local.iterdir()):
            _upload(child, remote / child.name)
    else:
        remote.write_bytes(local.read_bytes())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a local temporary path to write; it becomes ``path`` (replacing any old file) when the block exits
    without an exception, and is removed otherwise. Readers see the old file or the complete new one."""
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="nlpress-upload-") as tmpdir:
            tmp = Path(tmpdir) / os.path.basename(os.fspath(path))
            yield tmp
            as_path(path).write_bytes(tmp.read_bytes())  # one object: the store shows it whole or not at all
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def is_complete(path: str | os.PathLike) -> bool:
    """True when directory ``path`` was published whole (see the module docstring): it holds the completion
    marker, or it is a local directory (renamed into place complete)."""
    if is_remote(path):
        return as_path(path).joinpath(COMPLETE_MARKER).exists()
    return os.path.isdir(path)


def _check_destination(path: str | os.PathLike, overwrite: bool) -> None:
    if is_remote(path):
        p = as_path(path)
        if p.joinpath(COMPLETE_MARKER).exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        if p.is_file():
            raise FileExistsError(f"{path} exists and is not a directory")
        return
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty local temporary directory that becomes directory ``path`` when the block exits without an
    exception, with the completion marker written last (see the module docstring).

    Raises ``FileExistsError`` if a complete ``path`` exists and ``overwrite`` is false (checked before any
    work). On an exception the temporary directory is removed and ``path`` is left as it was. On an object
    store an unmarked ``path`` (a killed upload) is replaced; a marked one being overwritten loses its marker
    first, so no reader trusts it while the new files arrive.
    """
    _check_destination(path, overwrite)
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="nlpress-upload-") as tmpdir:
            tmp = Path(tmpdir) / "dir"
            tmp.mkdir()
            yield tmp
            remote = as_path(path)
            if remote.exists():
                remote.joinpath(COMPLETE_MARKER).unlink(missing_ok=True)  # unpublished from here on
                logging.info("replacing %s", path)
                remote.rmtree(missing_ok=True)
            _upload(tmp, remote)
            remote.joinpath(COMPLETE_MARKER).write_text("")  # last: the directory is published
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text("")
        for f in tmp.rglob("*"):  # data on disk before the rename makes the directory visible
            if f.is_file():
                _fsync_file(f)
        if path.exists():
            old = temporary_path(path, "old")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------- reading

@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[str]:
    """Yields a local path with the content of file or directory ``path``: ``path`` itself on a disk; on an
    object store a download into a temporary folder, removed when the block exits. For readers that need a
    real file (tokenizers, onnxruntime, safetensors)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    remote = as_path(path)
    if not remote.exists():
        raise FileNotFoundError(f"{path} does not exist")

    def download(src: epath.Path, dst: Path) -> None:
        if src.is_dir():
            dst.mkdir()
            for child in src.iterdir():
                download(child, dst / child.name)
        else:
            dst.write_bytes(src.read_bytes())

    with tempfile.TemporaryDirectory(prefix="nlpress-download-") as tmpdir:
        local = Path(tmpdir) / remote.name
        download(remote, local)
        yield str(local)
