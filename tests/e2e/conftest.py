from __future__ import annotations

import subprocess

import pytest

from .cluster import REPO, TEST_IMAGE, Cluster


@pytest.fixture(scope="session")
def test_image() -> str:
    """The busybox image the end-to-end tests run; built by scripts/images/busybox.sh when missing."""
    if subprocess.run(["docker", "image", "inspect", TEST_IMAGE], capture_output=True).returncode != 0:
        subprocess.run(["bash", str(REPO / "scripts/images/busybox.sh")], check=True)
    return TEST_IMAGE


@pytest.fixture
def cluster(tmp_path, test_image):
    """A host and one runner, real processes; stopped with SIGTERM at the end (which must work)."""
    c = Cluster(tmp_path)
    try:
        c.start_host()
        c.add_runner(0)
        yield c
    finally:
        c.stop()


@pytest.fixture
def bare_cluster(tmp_path, test_image):
    """A host only: the test adds runners itself."""
    c = Cluster(tmp_path)
    try:
        c.start_host()
        yield c
    finally:
        c.stop()
