"""The parts of the VM network that need no kernel: names, MACs, DNS servers from resolv.conf, the address
book (a real file in a temporary folder)."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_runner.vm_network import (
    MAX_IFNAME,
    TAP_PREFIX,
    AddressBook,
    AddressesExhausted,
    VmNetworkError,
    bridge_mac,
    guest_dns_servers,
    mac_address,
    mac_for_address,
    read_guest_dns_servers,
    tap_name,
    task_id_of_tap,
)

task_ids = st.integers(min_value=0, max_value=(1 << 64) - 1)
MAC = re.compile(r"52:54:00(:[0-9a-f]{2}){3}")
IFNAME = re.compile(r"[0-9A-Za-z]+")


# ------------------------------------------------------------------------------------------- names


@given(task_ids)
def test_tap_name_is_short_prefixed_and_reversible(task_id: int) -> None:
    name = tap_name(task_id)
    assert name == tap_name(task_id)
    assert name.startswith(TAP_PREFIX)
    assert len(name) <= MAX_IFNAME
    assert IFNAME.fullmatch(name)
    assert task_id_of_tap(name) == task_id


@given(task_ids, task_ids)
def test_tap_names_differ_for_different_ids(a: int, b: int) -> None:
    assert (tap_name(a) == tap_name(b)) == (a == b)


def test_tap_name_limits() -> None:
    assert tap_name(0) == "krvm0"
    assert len(tap_name((1 << 64) - 1)) == MAX_IFNAME
    assert len(tap_name((1 << 63) - 1)) <= MAX_IFNAME  # the largest snowflake
    with pytest.raises(ValueError):
        tap_name(-1)
    with pytest.raises(ValueError):
        tap_name(1 << 64)


@pytest.mark.parametrize("name", ["eth0", "krvm", "krvm0a", "krvm-1", "kohaku-br0", "krvmZZZZZZZZZZZ", "krv"])
def test_other_names_are_no_task_taps(name: str) -> None:
    assert task_id_of_tap(name) is None


@given(task_ids)
def test_mac_address_is_deterministic_qemu_unicast(task_id: int) -> None:
    mac = mac_address(task_id)
    assert mac == mac_address(task_id)
    assert MAC.fullmatch(mac)


@given(task_ids, task_ids)
def test_mac_addresses_differ_for_different_ids(a: int, b: int) -> None:
    # 24 bits of a hash: a collision is possible in principle (documented), never among hypothesis's pairs
    if a != b:
        assert mac_address(a) != mac_address(b)


def test_mac_addresses_of_neighbouring_ids_differ() -> None:
    base = 7_300_000_000_000_000_000
    assert len({mac_address(base + i) for i in range(2000)}) == 2000


@given(st.integers(min_value=0, max_value=(1 << 32) - 1), st.integers(min_value=0, max_value=(1 << 32) - 1))
def test_mac_for_address_is_unique_within_a_slash_8(a: int, b: int) -> None:
    x, y = ipaddress.IPv4Address(a), ipaddress.IPv4Address(b)
    assert MAC.fullmatch(mac_for_address(x))
    same_slash_8 = a >> 24 == b >> 24
    if same_slash_8:
        assert (mac_for_address(x) == mac_for_address(y)) == (a == b)


def test_mac_for_address_examples() -> None:
    assert mac_for_address("10.200.0.2") == "52:54:00:c8:00:02"
    assert mac_for_address(ipaddress.IPv4Address("10.200.1.254")) == "52:54:00:c8:01:fe"


def test_bridge_mac_is_fixed_locally_administered_unicast() -> None:
    mac = bridge_mac("kohaku-br0")
    assert mac == bridge_mac("kohaku-br0") != bridge_mac("kohaku-br1")
    first = int(mac[:2], 16)
    assert first & 0b10 and not first & 0b1


# --------------------------------------------------------------------------------------------- DNS

RESOLVED_STUB = """\
# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).
nameserver 127.0.0.53
options edns0 trust-ad
search lan
"""

RESOLVED_UPSTREAM = """\
# This is /run/systemd/resolve/resolv.conf managed by man:systemd-resolved(8).
nameserver 192.168.1.1
nameserver 2001:db8::53
nameserver 192.168.1.1
search lan
"""


def test_loopback_stub_falls_through_to_resolveds_upstreams() -> None:
    assert guest_dns_servers([RESOLVED_STUB, RESOLVED_UPSTREAM]) == ["192.168.1.1", "2001:db8::53"]


def test_first_file_with_a_usable_server_wins() -> None:
    first = "nameserver 127.0.0.1\nnameserver 10.0.0.2\n"
    assert guest_dns_servers([first, RESOLVED_UPSTREAM]) == ["10.0.0.2"]


def test_loopback_and_unusable_addresses_are_left_out() -> None:
    text = "\n".join(
        [
            "nameserver 127.0.0.53",
            "nameserver 127.0.1.1",
            "nameserver ::1",
            "nameserver 0.0.0.0",
            "nameserver ::",
            "nameserver fe80::1%eth0",
            "nameserver fe80::1",
            "nameserver 203.0.113.7",
        ]
    )
    assert guest_dns_servers([text]) == ["203.0.113.7"]


def test_comments_and_garbage_are_ignored() -> None:
    text = "\n".join(
        [
            "# nameserver 198.51.100.1",
            "; nameserver 198.51.100.2",
            "nameserver",
            "nameserver not-an-address",
            "nameserver 300.1.1.1",
            "nameservers 198.51.100.3",
            "  nameserver   198.51.100.4   # trailing words",
            "domain example.org",
            "\x00\xff garbage",
            "nameserver 2001:DB8::1",
        ]
    )
    assert guest_dns_servers([text]) == ["198.51.100.4", "2001:db8::1"]


def test_no_usable_server_anywhere_is_empty() -> None:
    assert guest_dns_servers([]) == []
    assert guest_dns_servers(["", RESOLVED_STUB, "nameserver ::1\n"]) == []


def test_read_guest_dns_servers_skips_missing_files(tmp_path: Path) -> None:
    stub, upstream = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    stub.write_text(RESOLVED_STUB)
    upstream.write_text(RESOLVED_UPSTREAM)
    assert read_guest_dns_servers([tmp_path / "missing", stub, upstream]) == ["192.168.1.1", "2001:db8::53"]
    assert read_guest_dns_servers([tmp_path / "missing"]) == []


# ------------------------------------------------------------------------------------ address book


def test_allocate_reuses_and_skips_reserved(tmp_path: Path) -> None:
    book = AddressBook(tmp_path / "vm_addresses.json", "10.200.0.0/24", "10.200.0.1")
    first = book.allocate(11)
    assert first == ipaddress.IPv4Address("10.200.0.2")  # .0 network, .1 gateway
    assert book.allocate(11) == first
    assert book.allocate(12) == ipaddress.IPv4Address("10.200.0.3")
    assert book.get(11) == first and book.get(99) is None
    assert book.items() == {11: first, 12: ipaddress.IPv4Address("10.200.0.3")}


def test_gateway_in_the_middle_is_skipped(tmp_path: Path) -> None:
    book = AddressBook(tmp_path / "a.json", "10.200.0.0/29", "10.200.0.3")
    got = [book.allocate(i) for i in range(5)]
    assert [str(a) for a in got] == ["10.200.0.1", "10.200.0.2", "10.200.0.4", "10.200.0.5", "10.200.0.6"]


def test_persisted_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "vm_addresses.json"
    book = AddressBook(path, "10.200.0.0/24", "10.200.0.1")
    a, b = book.allocate(7), book.allocate(8)
    assert json.loads(path.read_text()) == {"7": str(a), "8": str(b)}
    book.release(7)
    again = AddressBook(path, "10.200.0.0/24", "10.200.0.1")
    assert again.items() == {8: b}
    assert again.allocate(9) == a  # the lowest free address, released by 7
    assert again.allocate(8) == b


def test_release_of_unknown_task_is_nothing(tmp_path: Path) -> None:
    path = tmp_path / "vm_addresses.json"
    book = AddressBook(path, "10.200.0.0/24", "10.200.0.1")
    book.release(5)
    assert not path.exists()


def test_exhaustion_is_a_clear_error(tmp_path: Path) -> None:
    book = AddressBook(tmp_path / "a.json", "10.200.0.0/29", "10.200.0.1")  # 8 addresses, 5 usable
    for i in range(5):
        book.allocate(i)
    with pytest.raises(AddressesExhausted, match=r"no free VM address in 10\.200\.0\.0/29"):
        book.allocate(99)
    assert book.get(99) is None
    book.release(2)
    assert book.allocate(99) == ipaddress.IPv4Address("10.200.0.4")


def test_entries_not_usable_under_the_settings_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(
        json.dumps(
            {
                "1": "10.200.0.5",
                "2": "10.99.0.5",  # another subnet (the setting changed)
                "3": "10.200.0.1",  # the gateway
                "4": "10.200.0.255",  # broadcast
                "5": "10.200.0.5",  # a duplicate
                "x": "10.200.0.6",
                "6": "nonsense",
            }
        )
    )
    book = AddressBook(path, "10.200.0.0/24", "10.200.0.1")
    assert book.items() == {1: ipaddress.IPv4Address("10.200.0.5")}


def test_unreadable_table_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text("{not json")
    book = AddressBook(path, "10.200.0.0/24", "10.200.0.1")
    assert book.items() == {}
    [aside] = tmp_path.glob("a.json.unreadable-*")
    assert aside.read_text() == "{not json"
    book.claim(4, "10.200.0.9")  # what an adopted VM does; then new VMs get other addresses
    assert book.allocate(5) == ipaddress.IPv4Address("10.200.0.2")
    assert AddressBook(path, "10.200.0.0/24", "10.200.0.1").get(4) == ipaddress.IPv4Address("10.200.0.9")


def test_claim(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    book = AddressBook(path, "10.200.0.0/24", "10.200.0.1")
    book.claim(1, "10.200.0.50")
    assert book.allocate(1) == ipaddress.IPv4Address("10.200.0.50")
    with pytest.raises(VmNetworkError, match="held by task 1"):
        book.claim(2, "10.200.0.50")
    with pytest.raises(VmNetworkError, match="not a usable address"):
        book.claim(2, "10.200.0.1")
    with pytest.raises(VmNetworkError, match="not a usable address"):
        book.claim(2, "10.201.0.9")
    assert AddressBook(path, "10.200.0.0/24", "10.200.0.1").items() == {
        1: ipaddress.IPv4Address("10.200.0.50")
    }


def test_gateway_outside_subnet_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        AddressBook(tmp_path / "a.json", "10.200.0.0/24", "10.201.0.1")
