"""tests/skip_missing_modules.py: on a foreign environment, tests that need an absent third-party module are
skipped naming it (at collection, in a conftest, in a fixture or in the test body); a missing module of this
project, or any other failure, still fails."""

import os
import subprocess
import sys
import textwrap

from tests import skip_missing_modules
from tests.multidevice import REPO

ABSENT = "nlpress_absent_extra_module"


def test_foreign_missing_module_is_read_off_the_message():
    assert skip_missing_modules.foreign_missing_module(f"E   ModuleNotFoundError: No module named '{ABSENT}'") == ABSENT
    assert skip_missing_modules.foreign_missing_module("No module named 'google.cloud'") == "google.cloud"
    assert skip_missing_modules.foreign_missing_module("No module named 'models.missing'") is None
    assert skip_missing_modules.foreign_missing_module("AssertionError: 1 != 2") is None


def test_plugin_skips_only_absent_third_party_modules(tmp_path):
    files = {
        "test_import.py": f"import {ABSENT}\n\ndef test_never():\n    pass\n",
        "test_body.py": f"""
            import pytest

            @pytest.fixture
            def needs_extra():
                import {ABSENT}

            def test_lazy_import():
                import {ABSENT}

            def test_fixture(needs_extra):
                pass

            def test_own_package_missing_is_an_error():
                import models.not_a_module

            def test_plain_failure():
                assert False

            def test_passes():
                pass
            """,
        "sub/conftest.py": f"import {ABSENT}\n",
        "sub/test_under_conftest.py": "def test_never():\n    pass\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p",
                           "tests.skip_missing_modules", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "2 failed, 1 passed, 4 skipped" in out, out
    reason = f"needs {ABSENT}, which is not installed here"
    for line in (f"SKIPPED [1] sub: {reason}", f"SKIPPED [1] test_import.py: {reason}",
                 f"SKIPPED [2] test_body.py: {reason}"):  # -rs folds the two skips of one file
        assert line in out, out
    assert "test_own_package_missing_is_an_error" in out and "test_plain_failure" in out
