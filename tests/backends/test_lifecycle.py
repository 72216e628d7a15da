"""The shared lifecycle state machine, on its own."""

from __future__ import annotations

import threading

import pytest

import virtkit
from virtkit import State
from virtkit.backends.lifecycle import ALLOWED, Lifecycle

ACTIONS = sorted(ALLOWED)


class TestTransitions:
    @pytest.mark.parametrize("state", list(State))
    @pytest.mark.parametrize("action", ACTIONS)
    def test_check_matches_table(self, state: State, action: str) -> None:
        """check() allows exactly the table's transitions and names state and action otherwise."""
        life = Lifecycle("vm", state)
        if state in ALLOWED[action]:
            life.check(action)
        else:
            with pytest.raises(virtkit.StateError) as info:
                life.check(action)
            assert info.value.state is state
            assert info.value.action == action
            assert "guest 'vm'" in str(info.value)

    def test_table_is_libvirt_like(self) -> None:
        """Start from shut off or crashed; pause only running; resume only paused."""
        assert ALLOWED["start"] == {State.SHUTOFF, State.CRASHED}
        assert ALLOWED["pause"] == {State.RUNNING}
        assert ALLOWED["resume"] == {State.PAUSED}
        assert State.SHUTOFF not in ALLOWED["kill"]
        assert State.RUNNING not in ALLOWED["undefine"]

    def test_messages_are_plain_english(self) -> None:
        """A StateError says what was tried, why not, and what to do."""
        with pytest.raises(
            virtkit.StateError, match=r"cannot pause guest 'vm': it is shut off \(start\(\)"
        ):
            Lifecycle("vm").check("pause")


class TestNotifications:
    def test_notify_respects_only_from(self) -> None:
        """A power-off reported after a kill is ignored, not an error."""
        life = Lifecycle("vm", State.SHUTOFF)
        assert not life.notify(State.SHUTOFF, only_from=frozenset({State.RUNNING}))
        life.set(State.RUNNING)
        assert life.notify(State.CRASHED, reason="boom", only_from=frozenset({State.RUNNING}))
        assert life.crash_reason == "boom"
        life.set(State.SHUTOFF)
        assert life.crash_reason is None

    def test_listeners_see_changes(self) -> None:
        """Listeners get (old, new) once per real change."""
        seen: list[tuple[State, State]] = []
        life = Lifecycle("vm")
        life.add_listener(lambda old, new: seen.append((old, new)))
        life.set(State.RUNNING)
        life.set(State.RUNNING)
        life.set(State.PAUSED)
        assert seen == [(State.SHUTOFF, State.RUNNING), (State.RUNNING, State.PAUSED)]

    def test_wait_for_wakes_on_other_thread(self) -> None:
        """wait_for returns when another thread changes the state."""
        life = Lifecycle("vm", State.RUNNING)
        timer = threading.Timer(0.05, life.set, args=(State.SHUTOFF,))
        timer.start()
        assert life.wait_for(lambda s: s is State.SHUTOFF, 10, "power off") is State.SHUTOFF
        timer.join()

    def test_wait_for_times_out(self) -> None:
        """wait_for raises virtkit.TimeoutError naming what did not happen."""
        life = Lifecycle("vm", State.RUNNING)
        with pytest.raises(virtkit.TimeoutError, match="did not power off within 0.01 s"):
            life.wait_for(lambda s: s is State.SHUTOFF, 0.01, "power off")


class TestStartWindow:
    """What a guest reports while start() is still returning belongs to the new run."""

    LIVE = frozenset({State.RUNNING, State.PAUSED})

    def test_power_off_during_start_is_applied_after_running(self) -> None:
        """A power-off reported from SHUTOFF during a start is kept, not dropped: the
        listeners see RUNNING, then SHUTOFF."""
        seen: list[tuple[State, State]] = []
        life = Lifecycle("vm", State.SHUTOFF)
        life.add_listener(lambda old, new: seen.append((old, new)))
        life.begin_start()
        assert not life.notify(State.SHUTOFF, only_from=self.LIVE)
        assert life.state is State.SHUTOFF and seen == []
        assert life.finish_start() is State.SHUTOFF
        assert life.state is State.SHUTOFF
        assert seen == [(State.SHUTOFF, State.RUNNING), (State.RUNNING, State.SHUTOFF)]
        assert life.notify(State.CRASHED, only_from=self.LIVE) is False  # the run is over

    def test_crash_and_pause_during_start_follow_the_table(self) -> None:
        """A crash keeps its reason; pause then resume during the start ends RUNNING; a
        resume alone (not from PAUSED) is ignored."""
        life = Lifecycle("vm", State.CRASHED)
        life.begin_start()
        life.notify(State.CRASHED, reason="boom", only_from=self.LIVE)
        assert life.finish_start() is State.CRASHED and life.crash_reason == "boom"
        life.set(State.SHUTOFF)
        life.begin_start()
        life.notify(State.RUNNING, only_from=frozenset({State.PAUSED}))
        life.notify(State.PAUSED, only_from=frozenset({State.RUNNING}))
        assert life.finish_start() is State.PAUSED
        life.set(State.SHUTOFF)
        life.begin_start()
        life.notify(State.PAUSED, only_from=frozenset({State.RUNNING}))
        life.notify(State.RUNNING, only_from=frozenset({State.PAUSED}))
        assert life.finish_start() is State.RUNNING and life.crash_reason is None

    def test_a_failed_start_forgets_what_its_run_reported(self) -> None:
        """abort_start(): the state stays what it was, later reports act on it again."""
        life = Lifecycle("vm", State.CRASHED)
        life.crash_reason = "old"
        life.begin_start()
        life.notify(State.SHUTOFF, only_from=self.LIVE)
        life.abort_start()
        assert life.state is State.CRASHED and life.crash_reason == "old"
        assert not life.notify(State.SHUTOFF, only_from=self.LIVE)

    def test_a_report_racing_finish_start_is_never_lost(self) -> None:
        """A power-off reported from another thread at any moment around finish_start()
        ends SHUTOFF (200 rounds)."""
        for _ in range(200):
            life = Lifecycle("vm", State.SHUTOFF)
            life.begin_start()
            go = threading.Barrier(2)

            def report(life: Lifecycle = life, go: threading.Barrier = go) -> None:
                go.wait()
                life.notify(State.SHUTOFF, only_from=self.LIVE)

            thread = threading.Thread(target=report)
            thread.start()
            go.wait()
            life.finish_start()
            thread.join()
            assert life.state is State.SHUTOFF
