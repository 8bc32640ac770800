"""The transition table, exhaustively, and the exit-code mapping."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_proto import LocalProtocolError
from kohakuriver_proto.lifecycle import (
    ACTIVE,
    FINAL,
    REACHABLE,
    TRANSITIONS,
    TaskStatus,
    TaskType,
    allowed_next,
    apply,
    check_transition,
    describe_exit,
    status_for_exit,
)

S = TaskStatus
ALL_TRIPLES = list(itertools.product(TaskType, TaskStatus, TaskStatus))

# The table, written out a second time by hand as (type letters, old, new): C = command, V = vps.
EXPECTED = {
    ("CV", S.PENDING_APPROVAL, S.PENDING), ("CV", S.PENDING_APPROVAL, S.REJECTED),
    ("CV", S.PENDING_APPROVAL, S.KILLED),
    ("CV", S.PENDING, S.ASSIGNING), ("CV", S.PENDING, S.RUNNING), ("CV", S.PENDING, S.FAILED),
    ("CV", S.PENDING, S.KILLED), ("CV", S.PENDING, S.LOST), ("V", S.PENDING, S.STOPPED),
    ("CV", S.ASSIGNING, S.PENDING), ("CV", S.ASSIGNING, S.RUNNING), ("CV", S.ASSIGNING, S.FAILED),
    ("CV", S.ASSIGNING, S.KILLED), ("CV", S.ASSIGNING, S.LOST), ("V", S.ASSIGNING, S.STOPPED),
    ("CV", S.RUNNING, S.PAUSED), ("C", S.RUNNING, S.COMPLETED), ("CV", S.RUNNING, S.FAILED),
    ("CV", S.RUNNING, S.KILLED), ("CV", S.RUNNING, S.KILLED_OOM), ("CV", S.RUNNING, S.LOST),
    ("V", S.RUNNING, S.STOPPED), ("V", S.RUNNING, S.ASSIGNING),
    ("CV", S.PAUSED, S.RUNNING), ("CV", S.PAUSED, S.FAILED), ("CV", S.PAUSED, S.KILLED),
    ("CV", S.PAUSED, S.LOST), ("V", S.PAUSED, S.STOPPED), ("V", S.PAUSED, S.ASSIGNING),
    ("V", S.LOST, S.RUNNING), ("V", S.LOST, S.PAUSED), ("V", S.LOST, S.ASSIGNING),
    ("V", S.STOPPED, S.ASSIGNING), ("V", S.FAILED, S.ASSIGNING), ("V", S.KILLED, S.ASSIGNING),
    ("V", S.KILLED_OOM, S.ASSIGNING),
}  # fmt: skip
LETTER = {TaskType.COMMAND: "C", TaskType.VPS: "V"}


def expected_allowed(task_type, old, new):
    return any(LETTER[task_type] in types and (o, n) == (old, new) for types, o, n in EXPECTED)


@pytest.mark.parametrize(("task_type", "old", "new"), ALL_TRIPLES)
def test_exhaustive_table(task_type, old, new):
    assert check_transition(task_type, old, new) is expected_allowed(task_type, old, new)
    if old == new:
        assert apply(task_type, old, new) is new  # idempotent repeat, not a transition
    elif expected_allowed(task_type, old, new):
        assert apply(task_type, old, new) is new
    else:
        with pytest.raises(LocalProtocolError, match=f"{old.value} -> {new.value}"):
            apply(task_type, old, new)


def test_table_has_no_rows_beyond_the_expected_ones():
    assert len(TRANSITIONS) == len(EXPECTED)
    for (old, new), (types, why) in TRANSITIONS.items():
        assert old != new and types and why


@pytest.mark.parametrize(("task_type", "old", "new"), ALL_TRIPLES)
def test_no_final_to_final(task_type, old, new):
    if old in FINAL and new in FINAL and old != new:
        assert not check_transition(task_type, old, new)


@pytest.mark.parametrize("old", sorted(FINAL))
def test_command_tasks_never_leave_a_final_status(old):
    assert allowed_next(TaskType.COMMAND, old) == frozenset()


def test_lost_command_task_stays_lost_but_a_vps_comes_back():
    for new in (S.COMPLETED, S.FAILED, S.KILLED_OOM, S.RUNNING):
        assert not check_transition(TaskType.COMMAND, S.LOST, new)
    assert check_transition(TaskType.VPS, S.LOST, S.RUNNING)
    assert not check_transition(TaskType.VPS, S.LOST, S.STOPPED)


def test_rejected_is_final_for_everyone():
    assert S.REJECTED in FINAL
    for task_type in TaskType:
        assert allowed_next(task_type, S.REJECTED) == frozenset()


def test_sets():
    assert {S.ASSIGNING, S.PENDING, S.RUNNING, S.PAUSED} == ACTIVE
    assert not ACTIVE & FINAL
    assert REACHABLE <= ACTIVE
    assert FINAL | ACTIVE | {S.PENDING_APPROVAL} == set(TaskStatus)


def test_every_non_final_status_can_end():
    """No dead ends: from every non-final status a final status is reachable, for both types."""
    for task_type in TaskType:
        for start in set(TaskStatus) - FINAL:
            seen, todo = {start}, [start]
            while todo:
                for nxt in allowed_next(task_type, todo.pop()):
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
            assert seen & FINAL, (task_type, start)


@given(st.sampled_from(list(TaskType)), st.lists(st.sampled_from(list(TaskStatus)), max_size=40))
def test_random_walks_never_replace_a_final_status(task_type, proposals):
    status = S.PENDING_APPROVAL
    for new in proposals:
        try:
            after = apply(task_type, status, new)
        except LocalProtocolError:
            continue
        if status in FINAL and after in FINAL:
            assert after == status
        if task_type is TaskType.COMMAND and status in FINAL:
            assert after == status
        status = after


def test_apply_accepts_plain_strings():
    assert apply("vps", "lost", "running") is S.RUNNING
    with pytest.raises(ValueError):
        apply("command", "running", "bogus")


def test_error_messages_say_why():
    with pytest.raises(LocalProtocolError, match="killed is final"):
        apply(TaskType.COMMAND, S.KILLED, S.COMPLETED)
    with pytest.raises(LocalProtocolError, match="cannot leave lost"):
        apply(TaskType.COMMAND, S.LOST, S.RUNNING)
    with pytest.raises(LocalProtocolError, match="not in the transition table"):
        apply(TaskType.COMMAND, S.PENDING_APPROVAL, S.RUNNING)


# -- exits ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "oom", "user", "task_type", "expected"),
    [
        (0, False, False, TaskType.COMMAND, S.COMPLETED),
        (0, False, False, TaskType.VPS, S.STOPPED),
        (1, False, False, TaskType.COMMAND, S.FAILED),
        (137, True, False, TaskType.COMMAND, S.KILLED_OOM),
        (137, False, False, TaskType.COMMAND, S.FAILED),  # plain SIGKILL is not OOM
        (137, True, True, TaskType.COMMAND, S.KILLED),  # the user asked for it
        (143, False, True, TaskType.COMMAND, S.KILLED),
        (0, True, False, TaskType.COMMAND, S.COMPLETED),  # a child was OOM-killed, main succeeded
        (1, True, False, TaskType.VPS, S.KILLED_OOM),
        (-1, False, False, TaskType.COMMAND, S.FAILED),
    ],
)
def test_status_for_exit(code, oom, user, task_type, expected):
    assert status_for_exit(code, oom_killed=oom, killed_by_user=user, task_type=task_type) is expected


@given(st.integers(-1000, 1000), st.booleans(), st.booleans(), st.sampled_from(list(TaskType)))
def test_exit_status_is_always_a_legal_end_of_running(code, oom, user, task_type):
    status = status_for_exit(code, oom_killed=oom, killed_by_user=user, task_type=task_type)
    assert status in FINAL
    assert check_transition(task_type, S.RUNNING, status)


def test_describe_exit():
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(2) == "exit code 2"
    assert describe_exit(137) == "killed by SIGKILL (exit 137)"
    assert describe_exit(143) == "killed by SIGTERM (exit 143)"
    assert "OOM" in describe_exit(137, oom_killed=True)
    assert describe_exit(128 + 40) == "killed by signal 40 (exit 168)"
