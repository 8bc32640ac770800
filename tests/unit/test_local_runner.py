"""Which registered node is the runner of this process (``kr up``): only the one it registered as."""

from kohakuriver_host.local_runner import LocalRunner


async def _never(*args: object) -> None:
    raise AssertionError("not called here")


def test_serves_only_its_own_registration():
    local = LocalRunner("gpu-box", "http://127.0.0.1:8001", _never)
    assert local.serves("gpu-box", "http://127.0.0.1:8001")
    assert local.serves("gpu-box", "http://127.0.0.1:8001/")  # a trailing slash is the same URL
    # The same name registered from another address is another machine: reached over the network.
    assert not local.serves("gpu-box", "http://10.0.0.7:8001")
    assert not local.serves("other", "http://127.0.0.1:8001")
