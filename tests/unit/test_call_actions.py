"""The one action vocabulary between the call and its shell: the call returns only
what the shell performs, and the shell performs each kind (and drops none silently)."""

from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import pytest
from callkit import seed_invite

from cluster.sip.transaction import Send
from workers.sip.b2bua import B2BUA
from workers.sip.call import ACTIONS, Cdr, Out, Reply, check


class FakeShell:
    """A B2BUA around recording fakes: what it sends, replies and writes."""

    def __init__(self) -> None:
        self.sent, self.cdrs, self.replies = [], [], []
        self.b2bua = B2BUA.__new__(B2BUA)
        self.b2bua.counters, self.b2bua.name = Counter(), "w"
        self.b2bua.transport = SimpleNamespace(send=lambda *a, **k: self.sent.append((a, k)))
        self.b2bua.answers = SimpleNamespace(
            reply=lambda req, source, status, reason=None, headers=(): (
                self.replies.append((status, reason)) or b"SIP/2.0 %d X\r\n\r\n" % status))
        self.b2bua.config = SimpleNamespace(calls=SimpleNamespace(trace=False))
        self.b2bua.store = SimpleNamespace(add_cdr=self.cdrs.append, load_call=lambda tag: None)
        self.b2bua.media = SimpleNamespace(end=lambda tag: None)


CDR = {"a_call_id": "a@x", "hangup_cause": "NORMAL_CLEARING", "hangup_side": "caller",
       "duration": 3}


def test_the_shell_performs_every_kind_of_action():
    shell = FakeShell()
    req = seed_invite()
    source = SimpleNamespace(addr=("10.0.0.1", 5060))
    shell.b2bua._perform("t", [Out(b"data", ("10.0.0.2", 5062), "h", 1), Reply(481),
                               Cdr(dict(CDR))], req, source)
    assert shell.sent == [((b"data", ("10.0.0.2", 5062)), {"host": "h", "sock_index": 1})]
    assert shell.replies == [(481, None)]
    assert shell.cdrs == [CDR]  # the codec comes in the call's own CDR record
    assert shell.b2bua.counters == Counter(calls_ended=1)
    assert set(ACTIONS) == {Out, Reply, Cdr}  # a new kind needs its branch in _perform


def test_an_action_the_shell_does_not_know_is_counted_and_logged(caplog):
    shell = FakeShell()
    with caplog.at_level(logging.ERROR, "b2bua"):
        shell.b2bua._perform("t", [Send(b"x", ("10.0.0.2", 5060))], None, None)
    assert shell.b2bua.counters["unhandled_actions"] == 1
    assert shell.sent == [] and "no way to perform" in caplog.text


def test_check_refuses_anything_outside_the_vocabulary():
    actions = [Out(b"x", ("h", 1), "h"), Reply(200), Cdr({})]
    assert check(actions) is actions
    with pytest.raises(TypeError, match="does not perform"):
        check([*actions, Send(b"x", ("h", 1))])
