"""A gs:// bucket on this machine: gcp-storage-emulator, a local Cloud Storage server, in a thread.

Every client of the project's object-store path speaks to it the way it speaks to Cloud Storage: gcsfs (under
``etils.epath``) and google-cloud-storage through ``STORAGE_EMULATOR_HOST``, TensorStore (Orbax's array
writes) through ``TENSORSTORE_GCS_HTTP_URL``. Its objects live in memory, so a file that reaches the bucket went
through the object-store API, and nothing written to a local path can pass for one. Needs the ``test`` and
``gcs`` extras (tests skip without them).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pytest

BUCKET = "nlpress-rehearsal"


def emulator_env(url: str) -> dict[str, str]:
    """Environment variables that point every Cloud Storage client at the server ``url``."""
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "nlpress-test"}


@contextlib.contextmanager
def emulated_bucket(bucket: str = BUCKET) -> Iterator[tuple[str, dict[str, str]]]:
    """Starts the server with an empty ``bucket`` and points this process's clients at it; yields
    ``("gs://<bucket>", environment for subprocesses)``."""
    pytest.importorskip("gcsfs", reason="the gcs extra (gcsfs) is not installed")
    server_module = pytest.importorskip("gcp_storage_emulator.server",
                                        reason="the test extra's gcp-storage-emulator is not installed")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    server = server_module.create_server("localhost", port, in_memory=True, default_bucket=bucket)
    server.start()
    env = emulator_env(f"http://localhost:{port}")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield f"gs://{bucket}", env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
