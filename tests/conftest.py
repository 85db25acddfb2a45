"""Shared fixtures: a subreaper test process, and controllers that are always cleaned up."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Controller

PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    # orphans of killed agents come to us (and are reaped) instead of PID 1, which never reaps
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@pytest.fixture
def controller_factory(tmp_path: Path) -> Iterator[object]:
    made: list[Controller] = []

    def make(name: str = "c", **kwargs: object) -> Controller:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        ctl = Controller(root, **kwargs)  # type: ignore[arg-type]
        made.append(ctl)
        return ctl

    yield make
    for ctl in made:
        ctl.cleanup()


@pytest.fixture
def ctl(controller_factory: object) -> Controller:
    """A controller on fresh temp dirs, not yet started."""
    return controller_factory()  # type: ignore[operator, no-any-return]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
