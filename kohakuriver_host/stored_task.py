"""The task as the host stores it: the public ``TaskRecord`` plus the host's own bookkeeping.

``StoredTask`` extends ``kohakuriver_proto.models.TaskRecord`` with fields the API never returns (dispatch
attempts and times, the retry backoff, the latest runner report, a VPS's public key and restart node). The
store keeps it as one JSON document (the converter's ``unstructure``: the record's keys in field order, then
these), hands it out typed, and lifecycle mutations return a new one (``attrs.evolve``), so every reader
names fields instead of dictionary keys and every write is validated by the same model the API documents.

``public_record`` is the API's view: the ``TaskRecord`` fields only, in their order, exactly the bytes the
HTTP answers have always had. A document written before a field existed reads back with its default.
"""

from __future__ import annotations

from typing import Any

import attrs

from kohakuriver_proto.converter import structure, unstructure
from kohakuriver_proto.models import TaskRecord
from kohakuriver_proto.models._fields import (
    check_bool,
    check_float,
    check_hostname_field,
    check_int,
    check_str,
    opt,
    v,
)
from kohakuriver_proto.models.overlay import check_ipv4


@attrs.frozen(kw_only=True)
class StoredTask(TaskRecord):
    """A task record with the host-internal fields (never returned by the API)."""

    #: Failed dispatches so far (the task fails after ``tasks_service.MAX_DISPATCH_ATTEMPTS``).
    dispatch_attempts: int = attrs.field(default=0, validator=v(check_int))
    #: Epoch seconds of the latest placement.
    dispatched_at: float | None = attrs.field(default=None, validator=opt(check_float))
    #: The runner accepted the latest dispatch (202); None while the task was never placed.
    dispatch_confirmed: bool | None = attrs.field(default=None, validator=opt(check_bool))
    #: Epoch seconds before which a requeued task is not placed again.
    retry_after: float | None = attrs.field(default=None, validator=opt(check_float))
    #: Epoch seconds of the latest runner report about it.
    last_report_at: float | None = attrs.field(default=None, validator=opt(check_float))
    #: A VPS's public key (not a secret, but not part of the record either): sent with every (re-)creation,
    #: so a restart injects the same key as the first start.
    ssh_public_key: str | None = attrs.field(default=None, validator=opt(check_str, max_len=16384))
    #: A restarted VPS must come back on the node that holds its snapshots: it is placed only there.
    restart_node: str | None = attrs.field(default=None, validator=opt(check_hostname_field))
    #: The overlay address reserved for it (``ip_token`` at submit or create): sent as ``overlay_ip`` with
    #: every (re-)creation; the reservation is held while the task has not ended (``overlay_service``).
    reserved_ip: str | None = attrs.field(default=None, validator=opt(check_ipv4))


_INTERNAL = attrs.fields(StoredTask)
K_ATTEMPTS = _INTERNAL.dispatch_attempts.name
K_DISPATCHED_AT = _INTERNAL.dispatched_at.name
K_CONFIRMED = _INTERNAL.dispatch_confirmed.name
K_RETRY_AFTER = _INTERNAL.retry_after.name
K_LAST_REPORT = _INTERNAL.last_report_at.name
K_SSH_PUBLIC_KEY = _INTERNAL.ssh_public_key.name
K_RESTART_NODE = _INTERNAL.restart_node.name
K_RESERVED_IP = _INTERNAL.reserved_ip.name

#: The document keys of the ``TaskRecord`` contract, in field order.
RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in attrs.fields(TaskRecord))
#: The document keys only the host reads (what ``list_task_documents`` drops for the API).
INTERNAL_KEYS: tuple[str, ...] = tuple(f.name for f in _INTERNAL if f.name not in set(RECORD_FIELDS))


def task_document(task: StoredTask) -> dict[str, Any]:
    """The stored JSON shape of ``task`` (``TaskRecord`` keys first, then the host's)."""
    return unstructure(task)


def task_from_document(doc: Any) -> StoredTask:
    """A stored document as a ``StoredTask`` (missing host fields take their defaults); ``ValidationError``
    if it is not one."""
    return structure(doc, StoredTask)


def public_record(task: StoredTask) -> dict[str, Any]:
    """The task as the API returns it: the ``TaskRecord`` fields of the stored document, in order."""
    doc = unstructure(task)
    return {k: doc[k] for k in RECORD_FIELDS}
