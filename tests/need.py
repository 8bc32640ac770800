"""What a test needs from the machine, said once: a missing real component (QEMU, Docker, ssh, a netns)
skips the test on a developer's machine and fails it under ``CI=true``, where a quiet skip would hide a
broken install step."""

from __future__ import annotations

import os
import shutil

import pytest


def need(ok: object, message: str) -> None:
    """Skip (or, under ``CI=true``, fail) unless ``ok`` is true."""
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def need_program(name: str, hint: str = "scripts/setup.sh installs it") -> str:
    """The path of ``name`` on PATH, or skip/fail saying it is missing."""
    path = shutil.which(name)
    need(path, f"{name} is not installed ({hint})")
    assert path is not None
    return path


def need_root(what: str) -> None:
    need(os.geteuid() == 0, f"{what} needs root")
