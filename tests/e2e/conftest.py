from __future__ import annotations

import pytest

from .cluster import TEST_IMAGE, local_image, running_cluster


@pytest.fixture(scope="session")
def test_image() -> str:
    """The busybox image the end-to-end tests run; built by scripts/images/busybox.sh when missing."""
    return local_image(TEST_IMAGE, "busybox.sh")


@pytest.fixture
def cluster(tmp_path, test_image):
    """A host and one runner, real processes; stopped with SIGTERM at the end (which must work)."""
    with running_cluster(tmp_path) as c:
        yield c


@pytest.fixture
def bare_cluster(tmp_path, test_image):
    """A host only: the test adds runners itself."""
    with running_cluster(tmp_path, runners=0) as c:
        yield c
