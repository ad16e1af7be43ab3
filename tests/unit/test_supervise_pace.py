"""How long supervisord's loop may sleep (cluster/supervise.py ``Pace``)."""

from supervisor.states import ProcessStates

from cluster.supervise import BUSY_POLL_SECONDS, Pace


def paced(states):
    pace = Pace()
    pace.states = lambda: iter(states)
    assert pace.timeout(1.0) == 0.0  # the first pass: the states are news
    return pace


def test_steady_programs_let_the_loop_sleep_as_long_as_asked():
    pace = paced([ProcessStates.RUNNING, ProcessStates.STOPPED, ProcessStates.EXITED,
                  ProcessStates.FATAL])
    assert pace.timeout(1.0) == 1.0


def test_a_program_starting_backing_off_or_stopping_keeps_sleeps_short():
    for state in (ProcessStates.STARTING, ProcessStates.BACKOFF, ProcessStates.STOPPING):
        pace = paced([ProcessStates.RUNNING, state])
        assert pace.timeout(1.0) == BUSY_POLL_SECONDS, state
        assert pace.timeout(0.05) == 0.05  # never longer than asked


def test_the_pass_after_a_reap_does_not_sleep_and_only_that_one():
    pace = paced([ProcessStates.RUNNING])
    pace.reaped = True
    assert pace.timeout(1.0) == 0.0
    assert pace.timeout(1.0) == 1.0


def test_a_change_of_state_is_acted_on_at_once():
    states = [ProcessStates.STOPPED]
    pace = Pace()
    pace.states = lambda: iter(states)
    assert pace.timeout(1.0) == 0.0  # supervisord's first pass: start the programs
    states[0] = ProcessStates.STARTING
    assert pace.timeout(1.0) == 0.0
    assert pace.timeout(1.0) == BUSY_POLL_SECONDS
    states[0] = ProcessStates.RUNNING
    assert pace.timeout(1.0) == 0.0
    assert pace.timeout(1.0) == 1.0
