"""A lease on a workdir in a bucket: one run per ``gs://`` workdir, as the flock of :mod:`experiments.runtime.workdir`
gives one run per local workdir.

An object store has no locks, but Cloud Storage has generation preconditions: a write with
``ifGenerationMatch=G`` happens only if the object's current generation is G (0: only if it does not exist). The
lease is the object ``<workdir>/.lock``, whose content and custom metadata name its holder (host, pid, start
time, a random token) and the holder's timeout:

* acquire: create it with ``ifGenerationMatch=0``. If it exists and was renewed (its ``updated`` time, the
  store's clock) within its holder's timeout, the run is refused at once, naming the holder. If it is older, the
  holder died (SIGKILL, a lost VM): it is taken over with a warning by overwriting it with
  ``ifGenerationMatch=<the stale generation>``, so of two runs taking over at once exactly one succeeds and the
  other is refused, naming the winner;
* heartbeat: a daemon thread rewrites it every ``timeout / 5`` with ``ifGenerationMatch=<our generation>``. A
  precondition failure there means another run holds it now; no successful renewal for longer than the timeout
  means another run may; either way the lease is lost and the run is stopped (``on_lost``, by default an
  interrupt of the main thread that :func:`experiments.runtime.workdir.lock` turns into ``WorkdirLostError``);
* release: delete it with ``ifGenerationMatch=<our generation>`` (one short try: if the store is down, the lease
  simply expires after its timeout).

Every request is conditional, so retrying it is safe, and every answer that could be a lost answer to an earlier
try (412 on a create or a renewal, 404 on a delete) is checked by reading the lease back: our token means our
write landed. Requests go through the Cloud Storage client (gcsfs has no generation preconditions besides
create-only) under the store retry policy of :mod:`models.retries`. Takeover compares the store's ``updated``
time with this host's clock: hosts are assumed NTP-synchronised (Cloud VMs are), to well within the timeout.
"""

from __future__ import annotations

import _thread
import dataclasses
import datetime
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from absl import logging

from models import retries

DEFAULT_TIMEOUT_S = 300.0
RENEWALS_PER_TIMEOUT = 5  # the holder renews every timeout / 5, so four renewals in a row may fail safely
RELEASE_BUDGET_S = 5.0  # a release does not wait out an outage: the lease expires instead

_timeout_s = DEFAULT_TIMEOUT_S


def configure(timeout_s: float) -> None:
    """Sets the timeout of the leases this process takes (``--lease_timeout_s``)."""
    global _timeout_s
    if not timeout_s > 0:
        raise ValueError(f"the lease timeout must be > 0 s, got {timeout_s}")
    _timeout_s = float(timeout_s)


def default_timeout_s() -> float:
    return _timeout_s


class LeaseHeldError(RuntimeError):
    """The lease is held by another live run; the message names it."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lease, as written in it."""

    token: str
    pid: int | None
    host: str | None
    started: str | None
    timeout_s: float

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def parse(cls, text: str | None) -> "Holder":
        try:
            record = json.loads(text or "")
            return cls(str(record["token"]), record.get("pid"), record.get("host"), record.get("started"),
                       float(record.get("timeout_s") or DEFAULT_TIMEOUT_S))
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls("", None, None, f"unknown (unreadable lease: {str(text)[:60]!r})", DEFAULT_TIMEOUT_S)


def _split(url: str) -> tuple[str, str]:
    bucket, _, name = url.removeprefix("gs://").partition("/")
    return bucket, name


class Lease:
    """The lease object ``url`` (``gs://bucket/.../.lock``); see the module docstring.

    Args:
      url: the lease object.
      timeout_s: how long the lease may go without renewal before another run takes it over.
      on_lost: called (from the heartbeat thread) with the reason when the lease is lost; by default the main
        thread is interrupted.
    """

    def __init__(self, url: str, timeout_s: float | None = None, *, on_lost: Callable[[str], None] | None = None):
        from google.cloud import storage as gcs

        self.url = url
        self.timeout_s = float(timeout_s or _timeout_s)
        self.holder = Holder(uuid.uuid4().hex, os.getpid(), socket.gethostname(),
                             datetime.datetime.now().astimezone().isoformat(timespec="seconds"), self.timeout_s)
        bucket, name = _split(url)
        self._blob = gcs.Client().bucket(bucket).blob(name)
        self._on_lost = on_lost or (lambda reason: _thread.interrupt_main())
        self.generation: int | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- requests (all conditional) -------------------------------------------------------------------

    def _read(self, budget_s: float | None = None):
        """(generation, age in s, holder) of the lease object as it stands, or None when there is none."""
        blob = retries.call(lambda: self._blob.bucket.get_blob(self._blob.name, retry=None, timeout=30),
                            f"GET {self.url}", budget_s=budget_s)
        if blob is None:
            return None
        age = (datetime.datetime.now(datetime.timezone.utc) - blob.updated).total_seconds()
        return blob.generation, max(age, 0.0), Holder.parse((blob.metadata or {}).get("holder"))

    def _write(self, if_generation_match: int, budget_s: float | None = None) -> bool:
        """Writes our record if the object's generation is ``if_generation_match``; False on a precondition
        failure that is not the lost answer of an earlier try of ours."""
        from google.api_core import exceptions

        self._blob.metadata = {"holder": self.holder.to_json()}
        try:
            retries.call(lambda: self._blob.upload_from_string(
                self.holder.to_json(), content_type="application/json", if_generation_match=if_generation_match,
                retry=None, timeout=30), f"POST {self.url}", budget_s=budget_s)
        except exceptions.PreconditionFailed:
            now = self._read(budget_s)
            if now is None or now[2].token != self.holder.token:
                return False
            self.generation = now[0]  # an earlier try of ours landed; its answer was lost
            return True
        self.generation = self._blob.generation
        return True

    # -- the lease ------------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Takes the lease or raises :class:`LeaseHeldError` naming its live holder; starts the heartbeat."""
        workdir = self.url.rsplit("/", 1)[0]
        for _ in range(3):  # each round ends unless the lease changed hands under us
            if self._write(if_generation_match=0):
                break
            current = self._read()
            if current is None:
                continue  # released in between: try to create it again
            generation, age, holder = current
            if age <= holder.timeout_s:
                raise LeaseHeldError(
                    f"{workdir} is in use by {holder} (lease {self.url}, renewed {age:.0f} s ago; a lease not renewed "
                    f"for {holder.timeout_s:g} s is taken over): wait for that run to finish or stop it, or use "
                    "another workdir")
            if self._write(if_generation_match=generation):
                logging.warning("taking over the lease of %s: it was left by %s, not renewed for %.0f s (its timeout "
                                "%g s; killed?)", workdir, holder, age, holder.timeout_s)
                break
        else:
            raise LeaseHeldError(f"{workdir}: its lease {self.url} kept changing hands; try again")
        self._thread = threading.Thread(target=self._heartbeat, name="workdir-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        interval = self.timeout_s / RENEWALS_PER_TIMEOUT
        last_renewal = time.monotonic()
        while not self._stop.wait(interval):
            try:
                renewed = self._write(if_generation_match=self.generation, budget_s=interval)
            except Exception as e:  # noqa: BLE001 - a failed renewal is retried at the next beat, up to the timeout
                silent = time.monotonic() - last_renewal
                if silent > self.timeout_s:
                    return self._lose(f"it could not be renewed for {silent:.0f} s, longer than its timeout "
                                      f"({self.timeout_s:g} s), so another run may have taken it over ({e})")
                logging.warning("could not renew the lease %s (%s); %.0f s left before it expires", self.url, e,
                                self.timeout_s - silent)
                continue
            if not renewed:
                current = self._read(budget_s=interval)
                who = current[2] if current else "nobody (it was deleted)"
                return self._lose(f"it is now held by {who}")
            last_renewal = time.monotonic()

    def _lose(self, reason: str) -> None:
        self.lost = f"the lease {self.url} was lost: {reason}; this run stops so that two runs never write one workdir"
        logging.error("%s", self.lost)
        self._on_lost(self.lost)

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease if it is still ours (one short try; see the module docstring)."""
        from google.api_core import exceptions

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.lost or self.generation is None:
            return
        try:
            retries.call(lambda: self._blob.delete(if_generation_match=self.generation, retry=None, timeout=30),
                         f"DELETE {self.url}", budget_s=min(RELEASE_BUDGET_S, retries.policy().budget_s))
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            pass  # gone already (a retried delete), or no longer ours: nothing of ours to release
        except Exception as e:  # noqa: BLE001 - the lease then expires after its timeout
            logging.warning("could not release the lease %s (%s): the next run takes it over after %g s", self.url, e,
                            self.timeout_s)
        self.generation = None
