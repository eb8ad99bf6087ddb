"""Pytest plugin for running the suite on an environment the project did not install (``make test-gpu``, a GPU
image): a test module, conftest, fixture or test that fails only because a third-party module is not installed
is reported as skipped, naming the module, instead of as an error.

    PYTHONPATH=. python3 -m pytest -p tests.skip_missing_modules -rs tests

A missing module of this project itself (``compression``, ``models``, ``experiments``, ``tests``) is a real error
and stays one. The plugin is opt-in: ``make test`` runs on the installed, pinned environment, where a missing
dependency is a bug to see, not to skip.
"""

from __future__ import annotations

import re

import pytest

OWN_PACKAGES = ("compression", "models", "experiments", "tests")
_NO_MODULE = re.compile(r"No module named '([\w.]+)'")


def foreign_missing_module(text: str) -> str | None:
    """The third-party module a ``ModuleNotFoundError`` message (in ``text``) names, or None (no such error, or a
    module of this project)."""
    match = _NO_MODULE.search(text)
    if match and match.group(1).split(".")[0] not in OWN_PACKAGES:
        return match.group(1)
    return None


def _skip(report, path, module: str) -> None:
    report.outcome = "skipped"
    report.longrepr = (str(path), None, f"Skipped: needs {module}, which is not installed here")


# Old-style hook wrappers (the report is changed in place): new-style ``wrapper=True`` needs pytest 8, and a GPU
# image may have an older one.
@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Collection (test modules and the conftests of a directory) failing on a missing third-party module."""
    report = (yield).get_result()
    if report.failed:
        module = foreign_missing_module(str(report.longrepr))
        if module:
            _skip(report, collector.path, module)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Fixture setup or a test body raising ModuleNotFoundError for a third-party module."""
    report = (yield).get_result()
    if report.failed and call.excinfo is not None and call.excinfo.errisinstance(ModuleNotFoundError):
        module = foreign_missing_module(str(call.excinfo.value))
        if module:
            _skip(report, item.path, module)
