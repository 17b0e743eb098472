from stickyproxy.sessions import EndReason, Session, SessionTable, missing_sessions, reason_for_loss


def session(sid, backend="b1", generation="g1"):
    return Session(sid, backend, generation, 0.0, 0.0)


def test_pin_count_and_end_with_a_reason(caplog):
    table = SessionTable()
    table.pin(session("s1"))
    table.pin(session("s2"))
    table.pin(session("s3", "b2"))
    assert len(table) == 3 and table.per_backend == {"b1": 2, "b2": 1}
    caplog.set_level("INFO", logger="stickyproxy")
    assert table.end("s1", EndReason.IDLE, "5m idle").id == "s1"
    assert table.end("s1", EndReason.IDLE) is None  # ending twice counts once
    assert table.ended_by_reason == {"idle": 1}
    assert table.why_ended("s1").reason is EndReason.IDLE
    assert 'SESSION_ENDED session=s1 backend=b1 reason=idle detail="5m idle"' in caplog.text


def test_end_backend_keeps_the_current_generation():
    table = SessionTable()
    table.pin(session("old", generation="pid1"))
    table.pin(session("new", generation="pid2"))
    ended = table.end_backend("b1", EndReason.BACKEND_DOWN, keep_generation="pid2")
    assert [s.id for s in ended] == ["old"] and table.get("new")


def test_remembered_ends_are_bounded():
    table = SessionTable(remember_ended=2)
    for i in range(5):
        table.pin(session(f"s{i}"))
        table.end(f"s{i}", EndReason.CLIENT_DELETE)
    assert table.why_ended("s0") is None and table.why_ended("s4")
    assert table.ended_by_reason["client_delete"] == 5


def test_missing_sessions_and_loss_reasons():
    pinned = [session("a"), session("b")]
    assert [s.id for s in missing_sessions(pinned, ["b", "z"])] == ["a"]
    assert reason_for_loss("oom") is EndReason.BACKEND_OOM
    assert reason_for_loss("memory") is EndReason.BACKEND_OOM
    assert reason_for_loss("exited") is EndReason.BACKEND_DOWN


def test_holder_finds_a_backends_session_whatever_id_its_client_sees():
    table = SessionTable()
    table.pin(Session("1", "b1", "", 0.0, 0.0))  # the client sees the backend's id
    table.pin(Session("signed-1", "b2", "", 0.0, 0.0, backend_sid="1"))  # a signed one
    assert table.holder("b1", "1").id == "1" and table.holder("b2", "1").id == "signed-1"
    assert table.holder("b3", "1") is None and table.holder("b1", "2") is None
    table.end("signed-1", EndReason.CLIENT_DELETE)
    assert table.holder("b2", "1") is None and table.holder("b1", "1").id == "1"
    table.end("1", EndReason.CLIENT_DELETE)
    assert table.holder("b1", "1") is None and not table._rewritten
