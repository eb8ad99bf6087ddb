"""Retries of object-store requests: one policy, a count of every retry, and the one place that decides.

What each client does on its own, and so where the retries live:

* gcsfs (every file of :mod:`models.storage`, and Orbax's own files through ``etils.epath``) retries each HTTP
  request up to 6 times on 408, 429, 500-504, dropped connections and socket read timeouts, sleeping 1-2, 2-3,
  4-5, 8-9 and 16-17 s (about 35 s in all), fixed in the class (not configurable), logged at debug level and not
  counted. It does not retry a request that runs into aiohttp's total timeout (``asyncio.TimeoutError``), and
  it redoes uploads blindly: a create-only upload (``ifGenerationMatch=0``) whose first try landed although its
  answer was lost fails its second try with 412, reported as ``FileExistsError``. Its ``isfile``/``isdir``
  answer False on any error, so an outage looks like a missing file.
* TensorStore (Orbax's arrays) retries 408, 429, 5xx and transport errors (connection reset, nothing received,
  timeouts) up to 32 times with delays doubling from 1 s to 32 s (about 15 minutes), counted in its metric
  ``/tensorstore/kvstore/gcs/retries``; its writes carry generation preconditions, so it checks a redone write
  itself. Orbax exposes no setting for it (``gcs_request_retries`` of the TensorStore context).
* The Cloud Storage client (the lease, :mod:`experiments.runtime.lease`) retries conditional requests.

So the retries live at the request level, under one :class:`RetryPolicy` for all three. :func:`install` registers
``RetryingGCSFileSystem`` for ``gs://``: its requests retry what gcsfs retries (HTTP 408, 429, 500, 502, 503,
504, dropped or refused connections, a token expired in flight) and total timeouts, with bounded exponential
backoff until the policy's budget is spent, logging and counting each retry; an upload whose try failed is
checked before it is redone (the object's MD5 against the payload: if the write landed, its answer is the object
as it now stands), a delete retried onto a 404 has succeeded, and ``isfile``/``isdir`` let errors other than "not
found" through. :mod:`experiments.runtime.checkpointing` gives TensorStore the same budget
(:func:`tensorstore_retries`), and the lease uses :func:`call`. A request that still fails when the budget is
spent raises :class:`StoreUnavailableError` naming the object, which stops the run; what was published before
stays usable. Not covered: gcsfs's ``get_file`` (whole-file downloads, unused here, keep gcsfs's own retries) and
the gRPC paths of zonal buckets.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import json
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

from absl import logging

T = TypeVar("T")
TRANSIENT_HTTP = (408, 429, 500, 502, 503, 504)


class StoreUnavailableError(RuntimeError):
    """A request to the object store still failed when the retry budget was spent; the message names the object.

    Not an ``OSError``: code that reads a failed read as "missing" or "corrupt" (``except OSError``) must not
    take an outage for either."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: waits ``initial_s``, doubling up to ``max_delay_s`` (each with jitter, 50-100%),
    until ``budget_s`` seconds have passed since the request first failed."""

    budget_s: float = 300.0
    initial_s: float = 0.1
    max_delay_s: float = 30.0

    def delay(self, retry: int) -> float:
        return min(self.max_delay_s, self.initial_s * 2 ** retry) * random.uniform(0.5, 1.0)

    def retries_within_budget(self) -> int:
        """How many retries the budget holds at full delays (TensorStore counts retries, not seconds)."""
        total, n = 0.0, 0
        while total < self.budget_s:
            total += min(self.max_delay_s, self.initial_s * 2 ** n)
            n += 1
        return max(n, 1)


_policy = RetryPolicy()
_counts: collections.Counter = collections.Counter()  # (client, reason) -> retries
_checks: collections.Counter = collections.Counter()  # "landed" / "redone": uploads checked before a redo
_lock = threading.Lock()


def configure(budget_s: float) -> None:
    """Sets the retry budget of every object-store request of this process (``--store_retry_budget_s``)."""
    global _policy
    if not budget_s > 0:
        raise ValueError(f"the store retry budget must be > 0 s, got {budget_s}")
    _policy = RetryPolicy(budget_s=float(budget_s), max_delay_s=min(30.0, max(float(budget_s) / 4, 0.1)))


def policy() -> RetryPolicy:
    return _policy


def transient_reason(exc: BaseException) -> str | None:
    """Why ``exc`` is worth a retry ("HTTP 503", "connection dropped", "timeout"), or None when it is not
    (missing object, permission, precondition, bad request)."""
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError)):
        return None
    code = getattr(exc, "code", None)
    code = code if isinstance(code, int) else getattr(exc, "status", None)  # gcsfs HttpError / aiohttp
    if isinstance(code, int):
        if code == 401 and "Invalid Credentials" in str(exc):  # a token that expired in flight: refreshed on retry
            return "HTTP 401 (expired token)"
        return f"HTTP {code}" if code in TRANSIENT_HTTP else None
    name = type(exc).__name__
    if name == "ProxyError":  # gcsfs turns 502 into requests' ProxyError
        return "HTTP 502"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) or "Timeout" in name:
        return "timeout"
    if isinstance(exc, ConnectionError) or name in (
            "ServerDisconnectedError", "ClientConnectionError", "ClientOSError", "ClientPayloadError",
            "ClientConnectorError", "ChunkedEncodingError", "ConnectionError", "RemoteDisconnected",
            "TransportError", "RefreshError", "ChecksumError"):
        return "connection dropped"
    return None


def _record(client: str, reason: str, what: str, retry: int, delay: float) -> None:
    with _lock:
        _counts[(client, reason)] += 1
        total = sum(_counts.values())
    logging.warning("object store: %s failed (%s); retry %d in %.2f s (%d retries in this process)", what, reason,
                    retry + 1, delay, total)


def counts() -> dict[str, int]:
    """Retries so far by client (``gcsfs``, ``cloud-storage``, ``tensorstore``), and upload checks."""
    with _lock:
        out = collections.Counter()
        for (client, _), n in _counts.items():
            out[client] += n
        out.update({f"uploads {k}": v for k, v in _checks.items()})
    out["tensorstore"] = tensorstore_retry_count()
    return dict(out)


def summary() -> str:
    """One log line: every retry of this process by client and reason, and the checked uploads."""
    with _lock:
        by_client: dict[str, list[str]] = collections.defaultdict(list)
        for (client, reason), n in sorted(_counts.items()):
            by_client[client].append(f"{reason} {n}")
        parts = [f"{client} {sum(_counts[(client, r)] for r in _reasons(client))} ({', '.join(items)})"
                 for client, items in by_client.items()]
        checks = dict(_checks)
    ts_retries = tensorstore_retry_count()
    if ts_retries:
        parts.append(f"tensorstore {ts_retries}")
    total = sum(_counts.values()) + ts_retries
    line = f"object-store retries: {total}" + (f": {'; '.join(parts)}" if parts else "")
    if checks:
        line += (f"; failed uploads checked before a redo: {sum(checks.values())} "
                 f"({checks.get('landed', 0)} had landed)")
    return line


def _reasons(client: str) -> list[str]:
    return [r for c, r in _counts if c == client]


def tensorstore_retry_count() -> int:
    """TensorStore's own count of retried GCS requests in this process (0 without TensorStore)."""
    try:
        import tensorstore as ts
    except ImportError:  # pragma: no cover - comes with orbax
        return 0
    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/gcs/retries")
    return int(sum(v.get("value", 0) for m in metrics for v in m.get("values", [])))


def tensorstore_retries() -> dict:
    """The TensorStore context entry that gives its GCS requests this policy's budget."""
    p = _policy
    return {"gcs_request_retries": {"max_retries": p.retries_within_budget(), "initial_delay": f"{p.initial_s}s",
                                    "max_delay": f"{p.max_delay_s}s"}}


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is an object store that stayed unavailable past the
    retry budget: ours, or TensorStore's "All N retry attempts failed"."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StoreUnavailableError) or "retry attempts failed" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _give_up(what: str, exc: BaseException, reason: str, tries: int, started: float) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"{what}: still failing after {tries} tries over {time.monotonic() - started:.1f} s ({reason}: "
        f"{type(exc).__name__}: {exc}); the object store is down or unreachable (retry budget "
        f"{_policy.budget_s:g} s, --store_retry_budget_s); rerun the same command once it is back: the run resumes "
        "from its last complete checkpoint")


def call(fn: Callable[[], T], what: str, client: str = "cloud-storage", budget_s: float | None = None) -> T:
    """``fn()`` retried on transient errors under the policy (``budget_s`` overrides its budget); raises
    :class:`StoreUnavailableError` naming ``what`` when the budget is spent. For conditional (idempotent) requests."""
    budget = _policy.budget_s if budget_s is None else budget_s
    started, retry = None, 0
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            reason = transient_reason(e)
            if reason is None:
                raise
            started = started or time.monotonic()
            delay = _policy.delay(retry)
            if time.monotonic() + delay - started > budget:
                raise _give_up(what, e, reason, retry + 1, started) from e
            _record(client, reason, what, retry, delay)
            time.sleep(delay)
            retry += 1


# ------------------------------------------------------------------------------------------------ gcsfs


def _object_url(method: str, path: str, args: tuple, kwargs: dict, data: Any) -> str:
    """``gs://bucket/object`` (or the request) that a gcsfs request is about, for messages."""
    try:
        url = path.format(*[urllib.parse.quote(str(a), safe="") for a in args]) if args else path
    except (IndexError, KeyError):
        url = path
    match = re.search(r"/b/([^/?]+)(?:/o/?([^?]*))?", url) or re.match(r"b/([^/?]+)(?:/o/?([^?]*))?", url)
    if not match:
        return f"{method} {url}"
    bucket, name = match.group(1), urllib.parse.unquote(match.group(2) or "")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    name = (name or kwargs.get("name") or query.get("name", [""])[0] or kwargs.get("prefix")
            or (_upload_parts(data) or ({}, b""))[0].get("name", ""))
    return f"{method} gs://{bucket}/{name}"


def _upload_parts(data: Any) -> tuple[dict, bytes] | None:
    """(object resource, payload) of a gcsfs multipart upload body, or None for any other body."""
    if not isinstance(data, (bytes, bytearray)) or not data.startswith(b"--==0=="):
        return None
    _, _, rest = bytes(data).partition(b"\n\n")
    resource, _, rest = rest.partition(b"\n--==0==")
    _, _, payload = rest.partition(b"\n\n")
    try:
        return json.loads(resource), payload[: -len(b"\n--==0==--")]
    except ValueError:
        return None


def _whole_upload(method: str, url: str, kwargs: dict) -> tuple[str, str, bytes] | None:
    """(bucket, object, payload) of a request that uploads a whole object (a multipart upload, or a resumable
    session's one and only chunk), or None: what a failed try of it is checked against before a redo."""
    data = kwargs.get("data")
    if method not in ("POST", "PUT") or not isinstance(data, (bytes, bytearray, memoryview)):
        return None
    bucket = re.search(r"/b/([^/?]+)/o", url)
    if bucket is None:
        return None
    parts = _upload_parts(data)
    if parts is not None:
        return (bucket.group(1), parts[0]["name"], parts[1]) if "name" in parts[0] else None
    span = re.fullmatch(r"bytes 0-(\d+)/(\d+)", (kwargs.get("headers") or {}).get("Content-Range", ""))
    name = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).get("name")
    if span and name and int(span.group(1)) + 1 == int(span.group(2)) == len(data):
        return bucket.group(1), name[0], bytes(data)
    return None


def _gcsfs_class():
    import fsspec

    return fsspec.get_filesystem_class("gs")


def _make_filesystem_class():
    base = _gcsfs_class()
    request = getattr(base._request, "__wrapped__", None)  # gcsfs's request without its own retry decorator
    if request is None:
        raise RuntimeError("gcsfs changed: GCSFileSystem._request is no longer a decorated function")

    class RetryingGCSFileSystem(base):
        """gcsfs with this module's request retries (see the module docstring) in place of its own."""

        async def _request(self, method, path, *args, **kwargs):
            what = _object_url(method, path, args, kwargs, kwargs.get("data"))
            upload = _whole_upload(method, path, kwargs)
            started, retry = None, 0
            while True:
                try:
                    if retry and upload is not None:
                        landed = await self._landed(*upload, what)
                        if landed is not None:
                            return landed
                    return await request(self, method, path, *args, **kwargs)
                except FileNotFoundError:
                    if retry and method == "DELETE":  # an earlier try deleted it; its answer was lost
                        return 204, {}, None, b""
                    raise
                except Exception as e:  # noqa: BLE001 - classified below
                    reason = transient_reason(e)
                    if reason is None:
                        raise
                    started = started or time.monotonic()
                    delay = _policy.delay(retry)
                    if time.monotonic() + delay - started > _policy.budget_s:
                        raise _give_up(what, e, reason, retry + 1, started) from e
                    _record("gcsfs", reason, what, retry, delay)
                    await asyncio.sleep(delay)
                    retry += 1

        async def _landed(self, bucket, name, payload, what):
            """The object resource if a failed upload of ``payload`` landed after all (same MD5), else None."""
            try:  # a transient failure of the check is the try's failure: retried after the next wait
                _, _, _, contents = await request(self, "GET", "b/{}/o/{}", bucket, name)
                found = json.loads(contents)
            except FileNotFoundError:
                found = None
            md5 = base64.b64encode(hashlib.md5(payload).digest()).decode()
            landed = found is not None and found.get("md5Hash") == md5
            with _lock:
                _checks["landed" if landed else "redone"] += 1
            logging.warning("object store: %s: the failed upload %s", what,
                            "had landed (same MD5): not redone" if landed else "had not landed: redoing it")
            return (200, {}, None, contents) if landed else None

        async def _isfile(self, path):
            try:
                return (await self._info(path))["type"] == "file"
            except FileNotFoundError:
                return False

        async def _isdir(self, path):
            try:
                return (await self._info(path))["type"] == "directory"
            except FileNotFoundError:
                return False

    return RetryingGCSFileSystem


_installed = None


def install() -> None:
    """Registers :class:`RetryingGCSFileSystem` for ``gs://`` and ``gcs://`` with fsspec (what ``etils.epath``,
    and so Orbax, open); a no-op without gcsfs, and when already installed."""
    global _installed
    if _installed is not None:
        return
    try:
        import fsspec

        base = _gcsfs_class()
    except (ImportError, ValueError):  # no gcs extra: no gs:// paths
        return
    if getattr(base, "_nlpress_retrying", False):
        _installed = base
        return
    cls = _make_filesystem_class()
    cls._nlpress_retrying = True
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, cls, clobber=True)
    _installed = cls
