"""Post-promotion monitoring end to end: drift -> events -> webhook -> rollback."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from allocator_client import AllocatorClient
from allocator_client.v1 import allocator_pb2 as pb
from prometheus_client import CollectorRegistry
from scipy import stats as sps

from allocator import cli, supervisor
from allocator.app import Record
from allocator.lifecycle import Action, Event, EventType, State
from allocator.monitor import CusumSettings, PromotionMonitor, Reaction, Regression
from allocator.promotion import PromotionDecision
from allocator.server import Running, create_server
from allocator.store import RewardRow, SqlStore, StoreUnavailable, VersionConflict
from allocator.supervisor import monitor_settings
from tests.conftest import ADMIN_TOKEN, server_config


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/retrain", received
    httpd.shutdown()


def _start_fast(tmp_path: Path) -> Running:
    """A server whose supervisor ticks every 0.1 s, on the SQLite file of ``tmp_path``."""
    return create_server(
        server_config(f"sqlite:///{tmp_path / 's.sqlite'}", promotion_interval_s=0.1),
        registry=CollectorRegistry(),
    )


def _start_still(tmp_path: Path) -> Running:
    """A server whose supervisor passes once an hour: a test makes the passes it needs."""
    return create_server(
        server_config(f"sqlite:///{tmp_path / 's.sqlite'}", promotion_interval_s=3600.0),
        registry=CollectorRegistry(),
    )


@pytest.fixture
def fast_server(tmp_path: Path) -> Iterator[Running]:
    running = _start_fast(tmp_path)
    yield running
    running.stop(1.0)


def _wait(cond: Any, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_regression_after_promotion_rolls_back_and_calls_webhook(
    fast_server: Running, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = webhook
    spec = pb.ExperimentSpec(
        name="m",
        variants=["a", "b"],
        monitoring=pb.MonitoringSettings(
            detector=pb.DRIFT_DETECTOR_CUSUM,
            on_regression=pb.REGRESSION_ACTION_ROLLBACK,
            webhook_url=url,
        ),
    )
    rng = np.random.default_rng(3)
    with AllocatorClient(f"127.0.0.1:{fast_server.port}", admin_token=ADMIN_TOKEN) as c:
        c.create_experiment(spec)
        c.promote("m", "b", reason="test")
        _wait(lambda: _watching(fast_server, "m"))
        sent = 0

        def send(rate: float, n: int) -> None:
            nonlocal sent
            values = (rng.uniform(size=n) < rate).astype(float).tolist()
            ids = [f"e{sent + i}" for i in range(n)]
            c.reward_batch("m", values, event_ids=ids, variants=["b"] * n)
            sent += n

        # Burn-in (200 batches of 100) at 50%, then stable, then a drop to 20%: a shift of
        # 0.3 / (0.5 / sqrt(100)) = 6 batch-sd, which a k = 0.5 CUSUM with ARL0 1e6 flags
        # within a few batches (expected delay ~ h / (6 - 0.5) ~ 2 batches).
        for _ in range(25):
            send(0.5, 1000)
        assert fast_server.app.records["m"].lifecycle.state.value == "PROMOTED"
        for _ in range(5):
            send(0.2, 1000)
        _wait(lambda: fast_server.app.records["m"].lifecycle.state.value == "ROLLED_BACK")
        exp = c.get_experiment("m")
        assert exp.state == pb.EXPERIMENT_STATE_ROLLED_BACK and exp.champion == "a"
        _wait(lambda: any(r["event"] == "RETRAIN_REQUESTED" for r in received))
    kinds = [r["event"] for r in received]
    assert kinds.index("DRIFT_DETECTED") < kinds.index("RETRAIN_REQUESTED")
    retrain = next(r for r in received if r["event"] == "RETRAIN_REQUESTED")
    assert retrain["experiment"] == "m" and retrain["variant"] == 1
    assert set(retrain) >= {"event", "experiment", "variant", "at", "reason", "details"}
    audit = fast_server.app.store.list_audit(fast_server.app.records["m"].id)
    rollback = [a for a in audit if a.action == "ROLLBACK"]
    assert len(rollback) == 1 and rollback[0].actor == "monitor"


def test_page_hinkley_regression_rolls_back(fast_server: Running) -> None:
    """The Page-Hinkley detector reads its delta (0.5) and lambda (its default, CUSUM's h
    for ARL0 1e6, ~12) in batch-sd units, as the proto says. Burn-in at 50%, then a drop to
    20%: 6 batch-sd, so each batch adds about 6 * 250/(250 + j) - 0.5 ~ 5.4 to the walk,
    and it crosses ~12 in ~3 batches. Read in reward units the drop (0.3) is below delta
    and the walk would never move."""
    spec = pb.ExperimentSpec(
        name="m",
        variants=["a", "b"],
        monitoring=pb.MonitoringSettings(
            detector=pb.DRIFT_DETECTOR_PAGE_HINKLEY, on_regression=pb.REGRESSION_ACTION_ROLLBACK
        ),
    )
    rng = np.random.default_rng(6)
    with AllocatorClient(f"127.0.0.1:{fast_server.port}", admin_token=ADMIN_TOKEN) as c:
        c.create_experiment(spec)
        c.promote("m", "b", reason="test")
        _wait(lambda: _watching(fast_server, "m"))
        _send_rate(c, rng, "before", 0.5, 25)
        assert fast_server.app.records["m"].lifecycle.state.value == "PROMOTED"
        _send_rate(c, rng, "drop", 0.2, 5)
        _wait(lambda: fast_server.app.records["m"].lifecycle.state.value == "ROLLED_BACK")
    audit = fast_server.app.store.list_audit(fast_server.app.records["m"].id)
    rollback = [a for a in audit if a.action == "ROLLBACK"]
    assert len(rollback) == 1 and "PageHinkley" in rollback[0].reason


def _watching(running: Running, name: str = "m") -> bool:
    """Whether ``name``'s monitor is being fed (a restored one once the writer activated
    it, with its saved state and the catch-up)."""
    watch = running.supervisor._watches.get(name)
    return watch is not None and watch.active


def _monitored(action: pb.RegressionAction) -> pb.ExperimentSpec:
    return pb.ExperimentSpec(
        name="m",
        variants=["a", "b"],
        monitoring=pb.MonitoringSettings(detector=pb.DRIFT_DETECTOR_CUSUM, on_regression=action),
    )


def _watched(c: AllocatorClient, running: Running, action: pb.RegressionAction) -> None:
    """Experiment "m" (CUSUM, ``action``) created and b promoted, its monitor fed."""
    c.create_experiment(_monitored(action))
    c.promote("m", "b", reason="test")
    _wait(lambda: _watching(running))


def _send_rate(
    c: AllocatorClient, rng: np.random.Generator, tag: str, rate: float, rounds: int
) -> None:
    """``rounds`` RewardBatches of 1,000 Bernoulli(``rate``) rewards for variant b of "m"."""
    for i in range(rounds):
        values = (rng.uniform(size=1000) < rate).astype(float).tolist()
        ids = [f"{tag}{i}-{j}" for j in range(1000)]
        c.reward_batch("m", values, event_ids=ids, variants=["b"] * 1000)


def _saved_monitor(running: Running) -> dict[str, Any] | None:
    raw = running.app.store.get_meta(f"monitor:{running.app.records['m'].id}")
    return None if raw is None else json.loads(raw)


def _saved_rewards(running: Running) -> float:
    """How many of the champion's rewards the saved monitor state of "m" includes."""
    saved = _saved_monitor(running)
    return saved["state"]["promoted"]["stats"][0] if saved else 0.0


def test_monitor_survives_a_restart(tmp_path: Path) -> None:
    """The champion's monitor learns its reference (burn-in at 50%), the server restarts,
    then the rate drops to 20%: the restarted monitor flags it within the 50 batches that
    follow. Started from nothing it would be burning in on the dropped rate (200 batches)
    and take it for normal."""
    rng = np.random.default_rng(3)

    first = _start_fast(tmp_path)
    try:
        with AllocatorClient(f"127.0.0.1:{first.port}", admin_token=ADMIN_TOKEN) as c:
            _watched(c, first, pb.REGRESSION_ACTION_ROLLBACK)
            _send_rate(c, rng, "before", 0.5, 25)  # 250 batches of 100: past the burn-in (200)
        reference = first.supervisor._watches["m"].monitor.detector.state()

        _wait(lambda: _saved_rewards(first) == 25_000)
    finally:
        first.stop(1.0)
    second = _start_fast(tmp_path)
    try:
        _wait(lambda: _watching(second, "m"))
        assert second.supervisor._watches["m"].monitor.detector.state() == reference
        with AllocatorClient(f"127.0.0.1:{second.port}", admin_token=ADMIN_TOKEN) as c:
            # A drop of 0.3 / (0.5 / sqrt(100)) = 6 batch-sd: expected delay ~2 batches.
            _send_rate(c, rng, "after", 0.2, 5)
            _wait(lambda: second.app.records["m"].lifecycle.state.value == "ROLLED_BACK")
    finally:
        second.stop(1.0)


def test_saved_monitor_state_is_deleted_when_its_watch_ends(fast_server: Running) -> None:
    """Rollback ends the watch: its saved state goes (not one row per promotion ever
    made, forever); promoting again saves the new watch's state under its own key."""
    rng = np.random.default_rng(6)
    with AllocatorClient(f"127.0.0.1:{fast_server.port}", admin_token=ADMIN_TOKEN) as c:
        _watched(c, fast_server, pb.REGRESSION_ACTION_NOTIFY_ONLY)
        _send_rate(c, rng, "first", 0.5, 1)
        _wait(lambda: _saved_monitor(fast_server) is not None)
        first = _saved_monitor(fast_server)
        assert first is not None
        c.rollback("m", reason="test")
        _wait(lambda: _saved_monitor(fast_server) is None)
        c.add_variant("m", "c")  # reopens: no PROMOTE straight from ROLLED_BACK
        c.promote("m", "b", reason="again")
        _wait(lambda: _saved_monitor(fast_server) is not None)
        second = _saved_monitor(fast_server)
        assert second is not None
        assert second["key"]["promotion"] > first["key"]["promotion"]
        assert second["key"] == fast_server.supervisor._watches["m"].key


def test_promoting_the_same_variant_again_between_two_passes_starts_a_new_watch(
    tmp_path: Path,
) -> None:
    """Rollback and a new promotion of the same variant before the supervisor's next pass:
    the champion is the same, the promotion is not. The old watch (reference and statistic
    of the rolled-back promotion) must end and a new one start for the new promotion."""
    running = _start_still(tmp_path)
    try:
        sup = running.supervisor
        with AllocatorClient(f"127.0.0.1:{running.port}", admin_token=ADMIN_TOKEN) as c:
            c.create_experiment(_monitored(pb.REGRESSION_ACTION_NOTIFY_ONLY))
            c.promote("m", "b", reason="test")
            sup.tick()
            first = sup._watches["m"]
            c.rollback("m", reason="test")
            c.add_variant("m", "c")  # reopens: no PROMOTE straight from ROLLED_BACK
            c.promote("m", "b", reason="again")
            sup.tick()
        second = sup._watches["m"]
        assert second is not first
        before, after = first.key["promotion"], second.key["promotion"]
        assert isinstance(before, int) and isinstance(after, int) and after > before
        assert second.monitor is not first.monitor
    finally:
        running.stop(1.0)


def test_a_promotion_is_watched_from_its_commit_not_from_the_next_pass(
    tmp_path: Path,
) -> None:
    """The supervisor passes once an hour here: the rewards that follow a Promote must
    still all reach the new champion's monitor (they are the start of its burn-in)."""
    running = _start_still(tmp_path)
    try:
        with AllocatorClient(f"127.0.0.1:{running.port}", admin_token=ADMIN_TOKEN) as c:
            c.create_experiment(_monitored(pb.REGRESSION_ACTION_NOTIFY_ONLY))
            c.promote("m", "b", reason="test")
            assert _watching(running)
            _send_rate(c, np.random.default_rng(15), "first", 0.5, 2)

        def seen() -> float:
            return float(running.supervisor._watches["m"].monitor.state()["promoted"]["stats"][0])

        _wait(lambda: seen() == 2000)
    finally:
        running.stop(1.0)


def test_monitor_catches_up_on_rewards_logged_after_its_last_save(tmp_path: Path) -> None:
    """A crash between two saves: the restarted monitor replays the logged rewards after
    the positions saved with its state, so it ends where the crashed one was (every reward
    counted once), not one save interval behind."""
    rng = np.random.default_rng(9)
    first = _start_fast(tmp_path)
    try:
        with AllocatorClient(f"127.0.0.1:{first.port}", admin_token=ADMIN_TOKEN) as c:
            _watched(c, first, pb.REGRESSION_ACTION_NOTIFY_ONLY)
            _send_rate(c, rng, "saved", 0.5, 10)
            _wait(lambda: _saved_rewards(first) == 10_000)
            # What a crash does to the monitor: nothing more of it gets saved.
            first.app.tick_hooks.remove(first.supervisor.save_monitors)
            _send_rate(c, rng, "lost", 0.5, 7)
        crashed = first.supervisor._watches["m"].monitor.state()
    finally:
        first.stop(1.0)
    assert _saved_monitor(first) is not None
    assert crashed["promoted"]["stats"][0] == 17_000
    second = _start_fast(tmp_path)
    try:
        _wait(lambda: _watching(second))
        restored = second.supervisor._watches["m"].monitor.state()
        assert restored["promoted"]["stats"][0] == 17_000
        # The same walk too: the batches the detector saw are the same batches. The running
        # mean and M2 agree up to rounding: the replay merges the lost rewards in one array
        # where the live feed merged 7 of 1,000 (Welford's merge is exact only in reals).
        assert restored["promoted"]["stats"] == pytest.approx(
            crashed["promoted"]["stats"], rel=1e-12
        )
        rest = {k: v for k, v in restored["promoted"].items() if k != "stats"}
        assert rest == {k: v for k, v in crashed["promoted"].items() if k != "stats"}
        assert restored["look"] == crashed["look"]
        # And nothing is fed twice afterwards: new rewards add exactly themselves.
        with AllocatorClient(f"127.0.0.1:{second.port}", admin_token=ADMIN_TOKEN) as c:
            _send_rate(c, rng, "later", 0.5, 1)
        monitor = second.supervisor._watches["m"].monitor
        _wait(lambda: monitor.state()["promoted"]["stats"][0] == 18_000)
    finally:
        second.stop(1.0)


def test_catch_up_feeds_logged_rewards_in_the_order_they_were_received(
    fast_server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas' rows, received alternately, reach the monitor in that order, not
    one replica's stretch after the other's (the log's order)."""
    with AllocatorClient(f"127.0.0.1:{fast_server.port}", admin_token=ADMIN_TOKEN) as c:
        _watched(c, fast_server, pb.REGRESSION_ACTION_NOTIFY_ONLY)
    rec = fast_server.app.records["m"]
    store = fast_server.app.store
    for replica, times in (("ra", [1.0, 3.0, 5.0]), ("rb", [2.0, 4.0, 6.0])):
        rows = [
            RewardRow(
                dedup_key=f"{replica}{t}",
                experiment_id=rec.id,
                arm=1,
                value=t / 10,  # says when it was received
                epoch=0,
                received_at=t,
            )
            for t in times
        ]
        store.append_rewards(replica, rows)
    fed: list[float] = []
    sup = fast_server.supervisor
    monkeypatch.setattr(sup, "_observe", lambda watch, arms, values: fed.extend(values))
    watch = sup._watches["m"]
    monkeypatch.setattr(watch, "since", {"ra": 0, "rb": 0})
    sup._catch_up(rec, watch, {"ra": 3, "rb": 3})
    assert fed == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert watch.since == {"ra": 3, "rb": 3}


def test_pausing_a_promotion_keeps_its_saved_monitor_state(fast_server: Running) -> None:
    """PAUSE silences the monitor, RESUME brings back what it had learnt: not a new
    burn-in that would take whatever the rewards did meanwhile for normal."""
    rng = np.random.default_rng(10)
    with AllocatorClient(f"127.0.0.1:{fast_server.port}", admin_token=ADMIN_TOKEN) as c:
        _watched(c, fast_server, pb.REGRESSION_ACTION_NOTIFY_ONLY)
        _send_rate(c, rng, "before", 0.5, 3)
        _wait(lambda: _saved_rewards(fast_server) == 3_000)
        c.pause("m", reason="incident")
        _wait(lambda: "m" not in fast_server.supervisor._watches)
        # Two save passes or more (every snapshot_interval_s, 0.5 s in these tests) while
        # paused: the saved state stays.
        time.sleep(1.2)
        assert _saved_rewards(fast_server) == 3_000
        c.resume("m", reason="over")
        _wait(lambda: _watching(fast_server, "m"))
        monitor = fast_server.supervisor._watches["m"].monitor
        assert monitor.state()["promoted"]["stats"][0] == 3_000
        # Archived while paused: the promotion is over, its saved state goes.
        c.pause("m", reason="again")
        _wait(lambda: "m" in fast_server.supervisor._paused)
        c.archive_experiment("m")
        _wait(lambda: _saved_monitor(fast_server) is None)
        assert "m" not in fast_server.supervisor._paused


@pytest.mark.parametrize("seen_by", ["event", "pass"])
def test_archiving_after_a_restart_while_paused_deletes_the_saved_monitor_state(
    tmp_path: Path, seen_by: str
) -> None:
    """Restarted while the promotion is PAUSED, this process never watches it (the saved
    state waits for a RESUME); archiving it then must still delete that state, or it
    stays in the store forever. ``event``: archived here before any supervisor pass
    (they are an hour apart); ``pass``: the ARCHIVED event is not seen here (as for an
    archive made by another replica), so a pass must notice the state change."""
    interval = 3600.0 if seen_by == "event" else 0.1
    second = _restarted_with_saved_monitor(
        tmp_path, 2000, paused=True, promotion_interval_s=interval
    )
    try:
        if seen_by == "pass":
            second.app.event_listeners.remove(second.supervisor._on_state_change)
            _wait(lambda: second.supervisor._states.get("m") == State.PAUSED)  # a pass saw it
        assert "m" not in second.supervisor._watches and "m" not in second.supervisor._paused
        assert _saved_monitor(second) is not None
        with AllocatorClient(f"127.0.0.1:{second.port}", admin_token=ADMIN_TOKEN) as c:
            c.archive_experiment("m")
        _wait(lambda: _saved_monitor(second) is None)
    finally:
        second.stop(1.0)


def _restarted_with_saved_monitor(
    tmp_path: Path, rewards: int, *, paused: bool = False, **overrides: object
) -> Running:
    """A server whose monitor of "m" (NOTIFY_ONLY, champion b) saved ``rewards`` rewards
    (and, ``paused``, was then saved paused), stopped and started again with ``overrides``
    (a supervisor pass every 0.1 s unless they say otherwise)."""
    first = _start_fast(tmp_path)
    try:
        with AllocatorClient(f"127.0.0.1:{first.port}", admin_token=ADMIN_TOKEN) as c:
            _watched(c, first, pb.REGRESSION_ACTION_NOTIFY_ONLY)
            _send_rate(c, np.random.default_rng(12), "saved", 0.5, rewards // 1000)
            _wait(lambda: _saved_rewards(first) == rewards)
            if paused:
                c.pause("m", reason="incident")
                _wait(lambda: (saved := _saved_monitor(first)) is not None and saved["paused"])
    finally:
        first.stop(1.0)
    settings: dict[str, Any] = {"promotion_interval_s": 0.1, **overrides}
    return create_server(
        server_config(f"sqlite:///{tmp_path / 's.sqlite'}", **settings),
        registry=CollectorRegistry(),
    )


def test_pausing_a_monitor_not_yet_restored_keeps_its_saved_state(tmp_path: Path) -> None:
    """The writer has not yet activated the restored watch (it ticks once an hour here)
    when the promotion is paused: the watch has learnt nothing, so it must not write its
    blank state over the saved one. RESUME restores the saved state; in this corner the
    catch-up also feeds the rewards received while paused (the saved positions predate
    the pause), which the README documents."""
    second = _restarted_with_saved_monitor(tmp_path, 3000, sync_interval_s=3600.0)
    try:
        _wait(lambda: "m" in second.supervisor._watches)
        assert not second.supervisor._watches["m"].active
        with AllocatorClient(f"127.0.0.1:{second.port}", admin_token=ADMIN_TOKEN) as c:
            c.pause("m", reason="incident")
            _wait(lambda: "m" not in second.supervisor._watches)
            second.supervisor._next_save = 0.0
            second.supervisor.save_monitors()
            saved = _saved_monitor(second)
            assert saved is not None and saved["state"]["promoted"]["stats"][0] == 3000
            _send_rate(c, np.random.default_rng(13), "paused", 0.5, 1)
            c.resume("m", reason="over")
            _wait(lambda: "m" in second.supervisor._watches)
        second.supervisor.activate_monitors()
        assert _watching(second)
        stats = second.supervisor._watches["m"].monitor.state()["promoted"]["stats"]
        assert stats[0] == 4000
    finally:
        second.stop(1.0)


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda state: state.pop("promoted"), id="missing-field"),
        pytest.param(lambda state: state.update(look=float("inf")), id="overflow"),
    ],
)
def test_unusable_saved_monitor_state_starts_a_new_burn_in(
    tmp_path: Path, spoil: Callable[[dict[str, Any]], object]
) -> None:
    """A saved document this version cannot load must not stall the writer's ticks (its
    pulls and counts) for good: the monitor starts afresh and the writer stays healthy."""
    store_url = f"sqlite:///{tmp_path / 's.sqlite'}"
    _restarted_with_saved_monitor(tmp_path, 1000).stop(1.0)
    store = SqlStore.open(store_url)
    try:
        key = f"monitor:{store.list_experiments()[0].id}"
        doc = json.loads(store.get_meta(key) or "{}")
        spoil(doc["state"])
        store.set_meta(key, json.dumps(doc))
    finally:
        store.close()
    third = _start_fast(tmp_path)
    try:
        _wait(lambda: _watching(third))
        assert third.supervisor._watches["m"].monitor.state()["promoted"]["stats"][0] == 0
        time.sleep(1.0)  # more writer ticks
        assert third.app.writer.healthy, third.app.writer.last_error
    finally:
        third.stop(1.0)


def test_regression_reported_before_a_restart_is_not_reported_again(tmp_path: Path) -> None:
    """NOTIFY_ONLY: the drop is reported (DRIFT_DETECTED once) and the champion stays
    promoted. After a restart the monitor comes back triggered: more of the same low rate
    reports nothing new."""
    rng = np.random.default_rng(5)

    def drifts(running: Running) -> int:
        rec = running.app.records["m"]
        events = running.app.store.events_after(0, experiment_id=rec.id)
        return sum(e.type == "DRIFT_DETECTED" for e in events)

    first = _start_fast(tmp_path)
    try:
        with AllocatorClient(f"127.0.0.1:{first.port}", admin_token=ADMIN_TOKEN) as c:
            _watched(c, first, pb.REGRESSION_ACTION_NOTIFY_ONLY)
            _send_rate(c, rng, "before", 0.5, 25)
            _send_rate(c, rng, "drop", 0.2, 5)  # 6 batch-sd below: flagged in ~2 batches
            _wait(lambda: drifts(first) == 1)
            _wait(
                lambda: (
                    (saved := _saved_monitor(first)) is not None
                    and saved["state"]["regression"] is not None
                )
            )
    finally:
        first.stop(1.0)
    second = _start_fast(tmp_path)
    try:
        _wait(lambda: _watching(second, "m"))
        assert second.supervisor._watches["m"].monitor.triggered
        with AllocatorClient(f"127.0.0.1:{second.port}", admin_token=ADMIN_TOKEN) as c:
            _send_rate(c, rng, "after", 0.2, 5)
        time.sleep(0.5)  # several supervisor ticks
        assert drifts(second) == 1
        assert second.app.records["m"].lifecycle.state.value == "PROMOTED"
    finally:
        second.stop(1.0)


@pytest.mark.parametrize(
    ("reaction", "after"),
    [(pb.REGRESSION_ACTION_NOTIFY_ONLY, []), (pb.REGRESSION_ACTION_ROLLBACK, ["ROLLED_BACK"])],
)
def test_regression_events_the_store_refused_at_detection_are_recorded_once(
    fast_server: Running,
    monkeypatch: pytest.MonkeyPatch,
    reaction: pb.RegressionAction,
    after: list[str],
) -> None:
    """The monitor's events are emitted at detection, best effort: refused then (the store
    away for a moment), the reaction records them (with a rollback, in its transaction),
    once each, naming the promotion."""
    app = fast_server.app
    real_emit = app.emit
    refused: list[str] = []

    def flaky_emit(rec: Record, type_: EventType, *args: Any, **kwargs: Any) -> None:
        if type_ in (EventType.DRIFT_DETECTED, EventType.RETRAIN_REQUESTED) and len(refused) < 2:
            refused.append(type_.value)
            raise StoreUnavailable("append_event", "connection refused")
        real_emit(rec, type_, *args, **kwargs)

    monkeypatch.setattr(app, "emit", flaky_emit)
    rng = np.random.default_rng(8)

    def kinds() -> list[str]:
        stored = app.store.events_after(0, experiment_id=app.records["m"].id)
        return [e.type for e in stored if e.type not in ("CREATED", "PROMOTED")]

    with AllocatorClient(f"127.0.0.1:{fast_server.port}", admin_token=ADMIN_TOKEN) as c:
        _watched(c, fast_server, reaction)
        _send_rate(c, rng, "before", 0.5, 25)
        _send_rate(c, rng, "drop", 0.2, 5)  # 6 batch-sd below: flagged in ~2 batches
        expected = ["DRIFT_DETECTED", "RETRAIN_REQUESTED", *after]
        _wait(lambda: kinds() == expected)
        time.sleep(0.3)  # more passes: nothing recorded twice
    assert refused == ["DRIFT_DETECTED", "RETRAIN_REQUESTED"]
    assert kinds() == expected
    promotion = _promotion_seq_of(app.records["m"])
    retrain = [e for e in app.store.events_after(0) if e.type == "RETRAIN_REQUESTED"]
    assert json.loads(retrain[0].details_json or "{}")["promotion"] == promotion


def _promotion_seq_of(rec: Record) -> int:
    return max(a.seq for a in rec.lifecycle.audit if a.action == Action.PROMOTE)


def test_a_monitor_event_is_recorded_once_per_promotion(tmp_path: Path) -> None:
    """Found again (a restart whose monitor state was not saved since, its reaction never
    ran), a regression's event is not stored twice for the same promotion; for another
    promotion it is."""
    running = _start_still(tmp_path)
    try:
        app, sup = running.app, running.supervisor
        rec = app.create(pb.ExperimentSpec(name="m", variants=["a", "b"]))
        event = Event(EventType.RETRAIN_REQUESTED, "m", 1, 1.0, "drift")
        for promotion in (7, 7, 9):
            sup._emit(rec, promotion, event)
        stored = [e for e in app.store.events_after(0) if e.type == "RETRAIN_REQUESTED"]
        assert [json.loads(e.details_json)["promotion"] for e in stored] == [7, 9]
    finally:
        running.stop(1.0)


def test_events_an_earlier_version_stored_for_this_promotion_count_as_recorded(
    tmp_path: Path,
) -> None:
    """A RETRAIN_REQUESTED stored before events named their promotion, after this
    promotion began, is this regression's: only the missing DRIFT_DETECTED is recorded.
    One from before the promotion, or with details that are not an object, is not."""
    from allocator.store import EventRecord

    running = _start_still(tmp_path)
    try:
        app, sup = running.app, running.supervisor
        app.create(pb.ExperimentSpec(name="m", variants=["a", "b"]))
        before = app.clock() - 10
        app.transition("m", Action.PROMOTE, actor="t", reason="t", variant="b")
        rec = app.records["m"]
        seq = max(a.seq for a in rec.lifecycle.audit if a.action == Action.PROMOTE)
        watch = supervisor._Watch(1, PromotionMonitor("m", 1), {"promotion": seq})
        reg = _regression(Reaction.NOTIFY_ONLY)

        def missing() -> list[str]:
            return [e.type.value for e in sup._unrecorded(rec, watch, reg)]

        for at, details in ((before, "{}"), (app.clock(), "[1, 2]")):
            app.store.append_event(
                EventRecord(
                    experiment_id=rec.id, type="RETRAIN_REQUESTED", at=at, details_json=details
                )
            )
        assert missing() == ["DRIFT_DETECTED", "RETRAIN_REQUESTED"]
        app.store.append_event(
            EventRecord(experiment_id=rec.id, type="RETRAIN_REQUESTED", at=app.clock())
        )
        assert missing() == ["DRIFT_DETECTED"]
    finally:
        running.stop(1.0)


def test_reaction_that_fails_is_retried_and_other_experiments_go_on(
    fast_server: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rollback a regression calls for fails once (the store is down for it): the
    triggered monitor will not report the regression again, so the reaction must stay due
    and be made on a later pass. Meanwhile every pass also fails on another experiment,
    which must not hold up this one's reaction."""
    app = fast_server.app
    real_transition = app.transition
    refused: list[str] = []

    def flaky_transition(name: str, action: Action, **kwargs: Any) -> Record:
        if kwargs.get("actor") == "monitor" and not refused:
            refused.append(name)
            raise StoreUnavailable("transition", "connection refused")
        return real_transition(name, action, **kwargs)

    monkeypatch.setattr(app, "transition", flaky_transition)
    check_srm = fast_server.supervisor._check_srm

    def broken_for_x(rec: Record) -> None:  # runs on every pass for an adaptive experiment
        if rec.name == "x":
            raise RuntimeError("a bug checking x")
        check_srm(rec)

    monkeypatch.setattr(fast_server.supervisor, "_check_srm", broken_for_x)
    rng = np.random.default_rng(8)
    with AllocatorClient(f"127.0.0.1:{fast_server.port}", admin_token=ADMIN_TOKEN) as c:
        c.create_experiment(pb.ExperimentSpec(name="x", variants=["a", "b"]))
        _watched(c, fast_server, pb.REGRESSION_ACTION_ROLLBACK)
        _send_rate(c, rng, "before", 0.5, 25)
        _send_rate(c, rng, "drop", 0.2, 5)  # 6 batch-sd below: flagged in ~2 batches
        _wait(lambda: app.records["m"].lifecycle.state == State.ROLLED_BACK)
    assert refused == ["m"]
    rollbacks = [a for a in app.store.list_audit(app.records["m"].id) if a.action == "ROLLBACK"]
    assert len(rollbacks) == 1 and rollbacks[0].actor == "monitor"


def _regression(reaction: Reaction) -> Regression:
    return Regression("m", 1, "drift", 0.0, "test", reaction, 100, 9.0, 5.0, 0.2)


@pytest.mark.parametrize(
    "operator",
    [
        pytest.param(lambda c: c.rollback("m", reason="by hand"), id="rolled-back-by-hand"),
        pytest.param(lambda c: c.pause("m", reason="incident"), id="paused"),
        pytest.param(
            lambda c: (
                c.rollback("m", reason="by hand"),
                c.add_variant("m", "c"),
                c.promote("m", "b", reason="again"),
            ),
            id="promoted-again",
        ),
    ],
)
def test_a_reaction_is_not_applied_over_what_happened_since(
    tmp_path: Path, operator: Callable[[AllocatorClient], object]
) -> None:
    """A regression of promotion P is pending when an operator acts before the supervisor
    reacts: a rollback by hand must not be turned into a REOPEN (the old fallback), a
    pause must stay paused, and a new promotion (of the same variant, too) must not be
    rolled back for its predecessor's regression."""
    running = _start_still(tmp_path)
    try:
        app, sup = running.app, running.supervisor
        with AllocatorClient(f"127.0.0.1:{running.port}", admin_token=ADMIN_TOKEN) as c:
            c.create_experiment(_monitored(pb.REGRESSION_ACTION_ROLLBACK))
            c.promote("m", "b", reason="test")
            watch = sup._watches["m"]
            watch.pending = _regression(Reaction.ROLLBACK)
            operator(c)
            # As a pass sees it that read the watch before the operator's change (a new
            # promotion's own watch replaced it meanwhile).
            sup._watches["m"] = watch
            expected = app.records["m"].lifecycle.to_dict()
            version = app.records["m"].version
            sup._react(app.records["m"])  # the pass that had judged P still PROMOTED
        assert app.records["m"].lifecycle.to_dict() == expected
        assert app.records["m"].version == version
        audit = app.store.list_audit(app.records["m"].id)
        assert not any(a.actor == "monitor" for a in audit)
    finally:
        running.stop(1.0)


def test_a_rollback_with_no_earlier_champion_reopens(tmp_path: Path) -> None:
    """The control itself was promoted, so there is nothing to roll back to: the
    regression reopens the experiment instead."""
    running = _start_still(tmp_path)
    try:
        app, sup = running.app, running.supervisor
        with AllocatorClient(f"127.0.0.1:{running.port}", admin_token=ADMIN_TOKEN) as c:
            c.create_experiment(_monitored(pb.REGRESSION_ACTION_ROLLBACK))
            c.promote("m", "a", reason="the control won")
        sup._watches["m"].pending = _regression(Reaction.ROLLBACK)
        sup._react(app.records["m"])
        assert app.records["m"].lifecycle.state == State.REOPENED
        assert sup._watches["m"].pending is None
        with pytest.raises(VersionConflict):  # judged on a version that is gone
            app.transition("m", Action.PAUSE, actor="t", reason="t", if_version=1)
        assert app.records["m"].lifecycle.state == State.REOPENED
    finally:
        running.stop(1.0)


def test_stable_champion_is_not_rolled_back(fast_server: Running) -> None:
    spec = pb.ExperimentSpec(
        name="s",
        variants=["a", "b"],
        monitoring=pb.MonitoringSettings(on_regression=pb.REGRESSION_ACTION_ROLLBACK),
    )
    rng = np.random.default_rng(4)
    with AllocatorClient(f"127.0.0.1:{fast_server.port}", admin_token=ADMIN_TOKEN) as c:
        c.create_experiment(spec)
        c.promote("s", "b", reason="test")
        _wait(lambda: _watching(fast_server, "s"))
        for i in range(40):
            values = (rng.uniform(size=1000) < 0.5).astype(float).tolist()
            ids = [f"x{i}-{j}" for j in range(1000)]
            c.reward_batch("s", values, event_ids=ids, variants=["b"] * 1000)
        time.sleep(0.5)
        # 400 batches of 100: 200 of burn-in, then 200 watched. With ARL0 = 1e6 batches a
        # false alarm among them has probability ~ 200 / 1e6.
        assert c.get_experiment("s").state == pb.EXPERIMENT_STATE_PROMOTED


def _holdout_spec(holdout_share: float, **promotion: Any) -> pb.ExperimentSpec:
    return pb.ExperimentSpec(
        name="h",
        variants=["a", "b"],
        promotion=pb.PromotionSettings(**promotion),
        monitoring=pb.MonitoringSettings(holdout_share=holdout_share),
    )


@pytest.mark.parametrize(
    ("spec", "margin"),
    [
        pytest.param(_holdout_spec(0.1, indifference_margin=0.005), 0.005, id="margin"),
        pytest.param(
            _holdout_spec(0.1, indifference_margin=0.0, expected_loss_tolerance=0.004),
            0.0,
            id="margin-zero",
        ),
        pytest.param(_holdout_spec(0.1, expected_loss_tolerance=0.004), 0.004, id="tolerance"),
        pytest.param(_holdout_spec(0.1), None, id="default-1pct-of-mean"),
        pytest.param(_holdout_spec(0.0, indifference_margin=0.005), 0.0, id="no-holdout"),
    ],
)
def test_holdout_margin_is_the_promotion_margin(
    spec: pb.ExperimentSpec, margin: float | None
) -> None:
    """The holdout test allows what the promotion rule allowed: its indifference margin
    (which defaults to the expected-loss tolerance, and that to 1% of the leader's mean)."""
    settings = monitor_settings(spec)
    assert settings is not None and settings.holdout_margin == margin


def _holdout_run(champion_rate: float, margin: float, n_max: int) -> Regression | None:
    """The supervisor's monitor for a promotion with indifference ``margin``, a holdout at
    10% and the champion at ``champion_rate``, fed 1,000 rewards of each per step."""
    settings = monitor_settings(_holdout_spec(0.1, indifference_margin=margin))
    assert settings is not None
    # A drift detector that cannot fire, so only the holdout test can.
    quiet = dataclasses.replace(settings, detector=CusumSettings(k=0.5, h=50.0, burn_in=200))
    mon = PromotionMonitor("h", 1, holdout_variant=0, settings=quiet)
    rng = np.random.default_rng(17)
    reg = None
    for _ in range(n_max // 1000):
        reg = mon.observe_many(rng.random(1000) < champion_rate, now=1.0)
        reg = reg or mon.observe_many(rng.random(1000) < 0.10, now=1.0, holdout=True)
        if reg is not None:
            break
    return reg


def test_holdout_test_keeps_a_champion_within_the_promotion_margin() -> None:
    """A champion half the margin (0.005) below the holdout is a right promotion: not
    rolled back over 1,024,000 rewards each (11 looks).

    The looks spend 0.01 * 2**-(j+1) at min(n) = 1000 * 2**j, so P(any false flag) <= 0.01
    over an unbounded watch. At a true gap of -margin/2 it is smaller still: z has mean
    (margin/2)/se_j, and the sum over looks of Phi(Phi^-1(alpha_j) - (margin/2)/se_j) is
    ~0.004 (the first look's 0.003 dominates). With no margin (what the supervisor used
    to pass) z's mean is -(margin/2)/se_j, -6.0 at the last look against a critical value
    of -3.9: flagged with probability ~0.98 there alone.
    """
    se = [math.sqrt((0.0975 * 0.9025 + 0.09) / (1000 * 2**j)) for j in range(11)]
    bound = sum(
        sps.norm.cdf(sps.norm.ppf(0.01 * 2.0 ** -(j + 1)) - 0.0025 / se[j]) for j in range(11)
    )
    assert bound < 0.005
    assert _holdout_run(0.0975, 0.005, 1_024_000) is None


def test_holdout_test_flags_a_champion_worse_than_the_promotion_margin() -> None:
    """A champion 3x the margin (0.015) below the holdout is a regression. Against the
    margin the gap is -0.01, z's mean -0.01/se_j: at 64,000 each -6.2 against a critical
    value of -3.8 (alpha_6 = 7.8e-5), power 0.99; by 128,000 (-8.7 vs -3.95) ~1."""
    reg = _holdout_run(0.085, 0.005, 1_024_000)
    assert reg is not None and reg.kind == "holdout"
    assert reg.samples <= 128_000
    assert reg.holdout_mean is not None and reg.holdout_mean > reg.promoted_mean


def test_prediction_score_drift_is_reported(
    fast_server: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(5)
    with AllocatorClient(f"127.0.0.1:{fast_server.port}", admin_token=ADMIN_TOKEN) as c:
        c.create_experiment(pb.ExperimentSpec(name="d", variants=["a", "b"]))

        def send(prefix: str, mean: float, variant: str = "b") -> None:
            scores = rng.normal(mean, 0.1, size=300).tolist()
            c.reward_batch(
                "d",
                [1.0] * 300,
                event_ids=[f"{prefix}{variant}{i}" for i in range(300)],
                variants=[variant] * 300,
                prediction_scores=scores,
            )

        send("before", 0.5)
        send("before", 0.5, "a")
        c.promote("d", "b", reason="test")
        send("after", 0.7)
        send("after", 0.5, "a")  # the held-out control's scores did not move
        tests = {(t.name, t.variant): t for t in c.get_report("d").tests}
    assert cli.main(["--target", f"127.0.0.1:{fast_server.port}", "report", "d"]) == 0
    out = capsys.readouterr().out
    assert "ks_prediction_drift b scores now vs before: statistic" in out
    assert "drift b vs control" not in out
    ks = tests[("ks_prediction_drift", "b")]
    psi = tests[("psi_prediction_drift", "b")]
    # A 2-sd shift of 300 vs 300 scores: KS p-value is astronomically small, and PSI is
    # far above the 0.25 "significant shift" line.
    assert ks.p_value < 1e-6 and ks.statistic > 0.5
    assert psi.statistic > 0.25
    # Holm over the two KS tests (their own family): the smaller p doubled, the larger
    # at least that; PSI has no p-value to adjust.
    ks_a = tests[("ks_prediction_drift", "a")]
    assert ks.p_value_adjusted == pytest.approx(2 * ks.p_value)
    assert ks_a.p_value_adjusted == pytest.approx(min(1.0, max(ks_a.p_value, 2 * ks.p_value)))
    assert math.isnan(psi.p_value_adjusted)


def test_prediction_score_windows_survive_a_restart(tmp_path: Path) -> None:
    """Scores before and after the promotion, then a restart: the report's KS/PSI rows are
    the same as before it (rebuilt from the reward log), and scores sent afterwards join
    the current window. Kept in memory only, the restarted server had no reference window
    and, the experiment staying promoted, would never get one again."""
    rng = np.random.default_rng(8)

    def send(c: AllocatorClient, prefix: str, mean: float) -> None:
        c.reward_batch(
            "d",
            [1.0] * 300,
            event_ids=[f"{prefix}{i}" for i in range(300)],
            variants=["b"] * 300,
            prediction_scores=rng.normal(mean, 0.1, size=300).tolist(),
        )

    def drift_rows(c: AllocatorClient) -> dict[str, float]:
        return {
            t.name: t.statistic
            for t in c.get_report("d").tests
            if t.name.endswith("_prediction_drift") and t.variant == "b"
        }

    first = _start_fast(tmp_path)
    try:
        with AllocatorClient(f"127.0.0.1:{first.port}", admin_token=ADMIN_TOKEN) as c:
            c.create_experiment(pb.ExperimentSpec(name="d", variants=["a", "b"]))
            send(c, "before", 0.5)
            c.promote("d", "b", reason="test")
            send(c, "after", 0.7)
            before_restart = drift_rows(c)
    finally:
        first.stop(1.0)
    assert set(before_restart) == {"ks_prediction_drift", "psi_prediction_drift"}
    second = _start_fast(tmp_path)
    try:
        assert second.app.records["d"].scores.sizes() == {1: (300, 300)}
        with AllocatorClient(f"127.0.0.1:{second.port}", admin_token=ADMIN_TOKEN) as c:
            assert drift_rows(c) == before_restart
            send(c, "later", 0.7)
        assert second.app.records["d"].scores.sizes() == {1: (300, 600)}
    finally:
        second.stop(1.0)


def test_clear_winner_is_promoted_automatically_and_reproducibly(fast_server: Running) -> None:
    spec = pb.ExperimentSpec(
        name="auto",
        variants=["a", "b"],
        seed=21,
        traffic=pb.TrafficSettings(floor=0.2),
        promotion=pb.PromotionSettings(min_samples_per_variant=200),
    )
    rates = np.array([0.10, 0.30])
    rng = np.random.default_rng(6)
    with AllocatorClient(f"127.0.0.1:{fast_server.port}", admin_token=ADMIN_TOKEN) as c:
        c.create_experiment(spec)
        for _ in range(60):
            if c.get_experiment("auto").state == pb.EXPERIMENT_STATE_PROMOTED:
                break
            b = c.assign_batch("auto", 200)
            arms = np.array(b.variant_indices)
            values = (rng.uniform(size=arms.size) < rates[arms]).astype(float).tolist()
            c.reward_batch("auto", values, batch_token=b.batch_token, indices=list(range(200)))
            time.sleep(0.05)
        _wait(lambda: c.get_experiment("auto").state == pb.EXPERIMENT_STATE_PROMOTED)
        exp = c.get_experiment("auto")
        assert exp.champion == "b"
        status = c.get_report("auto").promotion
        assert status.candidate == "b" and status.reasons
    audit = [
        a
        for a in fast_server.app.store.list_audit(fast_server.app.records["auto"].id)
        if a.action == "PROMOTE"
    ]
    assert len(audit) == 1 and audit[0].actor == "promoter"
    assert "promotion rule met" in audit[0].reason


def test_a_discounted_experiment_reaches_min_samples_by_rewards_received(
    fast_server: Running,
) -> None:
    """With discount 0.999 the posterior weight of all rewards levels off near
    1 / (1 - 0.999) = 1,000 (about 500 per arm here), below a min_samples of 2,000:
    counted by that weight, the clear winner (0.5 vs 0.1 over 5,000 rewards each) could
    never be promoted. (Its always-valid bound, on the discounted weight as it should be,
    is met: 0.4 apart at ~500 each is ~15 standard errors.)"""
    spec = pb.ExperimentSpec(
        name="disc",
        variants=["a", "b"],
        policy=pb.POLICY_THOMPSON,
        discount=0.999,
        promotion=pb.PromotionSettings(min_samples_per_variant=2000),
    )
    rng = np.random.default_rng(9)
    with AllocatorClient(f"127.0.0.1:{fast_server.port}", admin_token=ADMIN_TOKEN) as c:
        c.create_experiment(spec)
        variants = ["a", "b"] * 5000  # interleaved: the discount ages both arms alike
        rates = np.array([0.1, 0.5] * 5000)
        values = (rng.uniform(size=rates.size) < rates).astype(float).tolist()
        ids = [f"e{i}" for i in range(rates.size)]
        c.reward_batch("disc", values, event_ids=ids, variants=variants)
        _wait(lambda: c.get_experiment("disc").state == pb.EXPERIMENT_STATE_PROMOTED)
        assert c.get_experiment("disc").champion == "b"
        reasons = c.get_report("disc").promotion.reasons
    assert any(r.startswith("min_samples: fewest rewards 5000 (a) >= 2000") for r in reasons)


def test_promotion_evaluation_is_reproducible(fast_server: Running) -> None:
    from allocator.promotion import evaluate
    from allocator.supervisor import promotion_settings

    spec = pb.ExperimentSpec(name="rep", variants=["a", "b", "c"], seed=9)
    stats_ = np.array([[500.0, 52.0, 52.0], [500.0, 61.0, 61.0], [500.0, 49.0, 49.0]])
    from allocator.policies import PolicyConfig

    first = evaluate(promotion_settings(spec), stats_, PolicyConfig(), 10.0, 1234)
    again = evaluate(promotion_settings(spec), stats_, PolicyConfig(), 10.0, 1234)
    assert first.action == again.action and first.reasons == again.reasons
    assert (first.p_best == again.p_best).all()


def test_srm_detected_by_the_sequential_test_and_reported(tmp_path: Path) -> None:
    """TABLE mode, A/A, the split refreshed every 100 rewards and the SRM test read by the
    supervisor every 0.1 s: quiet. Then one arm's decisions are counted 20% too often (a
    double-logging bug, applied between refreshes): SRM_DETECTED once, and the report's flag
    and sequential p-value say the same. A restart restores the flagged test and does not
    raise the alert again."""
    spec = pb.ExperimentSpec(
        name="srm",
        variants=["a", "b", "c"],
        allocation_mode=pb.ALLOCATION_MODE_TABLE,
        table_refresh_rewards=100,
        seed=5,
        promotion=pb.PromotionSettings(auto_promote=False),
    )
    fast_server = _start_fast(tmp_path)
    app = fast_server.app
    env = np.random.default_rng(0)

    def traffic(c: AllocatorClient, rounds: int, extra: float) -> None:
        for _ in range(rounds):
            b = c.assign_batch("srm", 1000)
            exp = app.engine._experiments["srm"]
            with exp.lock:
                exp.epoch_pulls[exp.epoch, 0] += int(
                    extra * np.sum(np.asarray(b.variant_indices) == 0)
                )
            values = (env.uniform(size=1000) < 0.1).astype(float).tolist()
            c.reward_batch("srm", values, batch_token=b.batch_token, indices=list(range(1000)))

    def srm_events() -> list[str]:
        rec = app.get("srm")
        return [
            e.type
            for e in app.store.events_after(0, experiment_id=rec.id)
            if e.type == "SRM_DETECTED"
        ]

    try:
        with AllocatorClient(f"127.0.0.1:{fast_server.port}", admin_token=ADMIN_TOKEN) as c:
            c.create_experiment(spec)
            traffic(c, 20, 0.0)
            time.sleep(0.5)  # several supervisor ticks
            rep = c.get_report("srm")
            assert rep.srm.decisions >= 19_000
            assert rep.srm.sequential_p_value > 0.001 and not rep.srm.flagged
            assert srm_events() == []
            traffic(c, 30, 0.2)
            _wait(lambda: srm_events() == ["SRM_DETECTED"])
            rep = c.get_report("srm")
            assert rep.srm.flagged and rep.srm.sequential_p_value < 0.001
            traffic(c, 5, 0.2)
            time.sleep(0.3)
            assert srm_events() == ["SRM_DETECTED"]  # once
    finally:
        fast_server.stop(1.0)
    restarted = _start_fast(tmp_path)
    app = restarted.app
    try:
        with AllocatorClient(f"127.0.0.1:{restarted.port}", admin_token=ADMIN_TOKEN) as c:
            rep = c.get_report("srm")
            assert rep.srm.flagged and rep.srm.sequential_p_value < 0.001  # restored
            time.sleep(0.5)  # several supervisor ticks of the new process
            assert srm_events() == ["SRM_DETECTED"]  # still once
    finally:
        restarted.stop(1.0)


def _decision(action: str, candidate: int, k: int) -> PromotionDecision:
    """What the promotion rule would say, whatever the data: a test picks the outcome."""
    return PromotionDecision(
        action=action,  # type: ignore[arg-type]
        candidate=candidate,
        p_best=np.zeros(k),
        expected_loss=np.zeros(k),
        reasons=("rule: test",),
        unmet=(),
        p_within_margin=np.zeros(k),
        lower_bounds=np.full(k, np.nan),
        tolerance=0.0,
        margin=0.0,
    )


def _judged(
    running: Running,
    monkeypatch: pytest.MonkeyPatch,
    action: str,
    candidate: int,
    meanwhile: Callable[[], object] = lambda: None,
) -> list[int]:
    """Make the rule say ``action`` (for ``candidate``) to every evaluation of "m", running
    ``meanwhile`` (an operator's change) once, between the first one's look at the
    experiment and its transition. Returns the evaluations' arm counts as they happen."""
    calls: list[int] = []

    def rule(*args: Any, **kwargs: Any) -> PromotionDecision:
        k = len(kwargs["variants"])
        calls.append(k)
        if len(calls) == 1:
            meanwhile()
        return _decision(action, candidate, k)

    monkeypatch.setattr(supervisor, "evaluate", rule)
    return calls


def _with_rewards(c: AllocatorClient, running: Running) -> None:
    """Experiment "m" (a, b) with a few rewards for each, applied (the rule looks at any)."""
    c.create_experiment(pb.ExperimentSpec(name="m", variants=["a", "b"]))
    c.reward_batch(
        "m", [1.0, 0.0] * 10, event_ids=[f"r{i}" for i in range(20)], variants=["a", "b"] * 10
    )
    _wait(lambda: running.app.engine.view("m").reward_counts.sum() == 20)


def _actors(running: Running) -> list[tuple[str, str]]:
    return [(a.action, a.actor) for a in running.app.store.list_audit(running.app.records["m"].id)]


def test_a_futility_stop_is_not_made_over_an_operators_promotion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pass judges "m" RUNNING and stops it for futility; meanwhile an operator
    promotes b. The futility rollback (legal from PROMOTED too) must not undo that."""
    running = _start_still(tmp_path)
    try:
        app, sup = running.app, running.supervisor
        with AllocatorClient(f"127.0.0.1:{running.port}", admin_token=ADMIN_TOKEN) as c:
            _with_rewards(c, running)
            calls = _judged(
                running, monkeypatch, "futility_stop", 0, lambda: c.promote("m", "b", reason="ship")
            )
            sup._pass(app.records["m"], True)
        lc = app.records["m"].lifecycle
        assert (lc.state, lc.champion, calls) == (State.PROMOTED, 1, [2])
        assert _actors(running) == [("CREATE", "api"), ("PROMOTE", "admin")]
        assert "FUTILITY_STOPPED" not in [t for t, _ in _events(running)]
    finally:
        running.stop(1.0)


def test_a_promotion_is_not_made_onto_a_variant_added_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pass judges b the winner of (a, b); meanwhile an operator adds c. Promoting
    then would end c's round at 0 samples: the decision is dropped, and the next pass
    (not 30 s later: no reward came) judges the three arms."""
    running = _start_still(tmp_path)
    try:
        app, sup = running.app, running.supervisor
        with AllocatorClient(f"127.0.0.1:{running.port}", admin_token=ADMIN_TOKEN) as c:
            _with_rewards(c, running)
            calls = _judged(running, monkeypatch, "promote", 1, lambda: c.add_variant("m", "c"))
            sup._pass(app.records["m"], True)
            lc = app.records["m"].lifecycle
            assert (lc.state, lc.n_variants, calls) == (State.RUNNING, 3, [2])
            assert "m" not in app.last_decisions  # judged on a state that is gone
            sup._pass(app.records["m"], True)
        assert calls == [2, 3]
        assert app.records["m"].lifecycle.state == State.PROMOTED  # what the rule said
        assert _actors(running) == [
            ("CREATE", "api"),
            ("ADD_VARIANT", "api"),
            ("PROMOTE", "promoter"),
        ]
    finally:
        running.stop(1.0)


def _events(running: Running) -> list[tuple[str, int | None]]:
    """The stored events of experiment m after its CREATED."""
    rec = running.app.records["m"]
    stored = running.app.store.events_after(0, experiment_id=rec.id)
    return [(e.type, e.variant) for e in stored if e.type != "CREATED"]


@pytest.mark.parametrize(
    ("promotions", "keep"),
    [
        # The control itself was promoted, then the round reopened: no earlier champion
        # to roll back to (the old rollback failed, after its event, on every pass).
        pytest.param(["a"], ("PROMOTE", "PROMOTED"), id="control-on-record"),
        # a -> b -> c, reopened: the previous champion is b, and the control is a.
        pytest.param(["b", "c"], ("ROLLBACK", "ROLLED_BACK"), id="after-two-promotions"),
        pytest.param([], ("ROLLBACK", "ROLLED_BACK"), id="running"),
    ],
)
def test_a_futility_stop_keeps_the_control_and_is_recorded_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    promotions: list[str],
    keep: tuple[str, str],
) -> None:
    running = _start_still(tmp_path)
    try:
        app, sup = running.app, running.supervisor
        with AllocatorClient(f"127.0.0.1:{running.port}", admin_token=ADMIN_TOKEN) as c:
            c.create_experiment(pb.ExperimentSpec(name="m", variants=["a", "b", "c"]))
            for v in promotions:
                c.promote("m", v, reason="test")
                app.transition("m", Action.REOPEN, actor="monitor", reason="regression")
            c.reward_batch(
                "m", [1.0, 0.0, 1.0], event_ids=["r0", "r1", "r2"], variants=["a", "b", "c"]
            )
            _wait(lambda: app.engine.view("m").reward_counts.sum() == 3)
            before = len(_events(running))
            calls = _judged(running, monkeypatch, "futility_stop", 0)
            for _ in range(3):
                sup._evaluated.clear()  # due every time, as if rewards kept coming
                sup._pass(app.records["m"], True)
            batch = c.assign_batch("m", 200)
        lc = app.records["m"].lifecycle
        assert (lc.state.value, lc.champion, len(calls)) == (keep[1], 0, 1)
        assert set(batch.variant_indices) == {0}  # all traffic to the control
        assert _events(running)[before:] == [("FUTILITY_STOPPED", 0), (keep[1], 0)]
        assert _actors(running)[-1] == (keep[0], "promoter")
    finally:
        running.stop(1.0)


def test_a_futility_stop_whose_transition_fails_records_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store refuses the rollback: no FUTILITY_STOPPED without it (it would be recorded
    again by the retry); the next pass makes both."""
    running = _start_still(tmp_path)
    try:
        app, sup = running.app, running.supervisor
        with AllocatorClient(f"127.0.0.1:{running.port}", admin_token=ADMIN_TOKEN) as c:
            _with_rewards(c, running)
        _judged(running, monkeypatch, "futility_stop", 0)
        real = app.store.update_state
        refused: list[str] = []

        def flaky(name: str, **kwargs: Any) -> Any:
            if not refused:
                refused.append(name)
                raise StoreUnavailable("update_state", "connection refused")
            return real(name, **kwargs)

        monkeypatch.setattr(app.store, "update_state", flaky)
        with pytest.raises(StoreUnavailable):
            sup._pass(app.records["m"], True)
        assert app.records["m"].lifecycle.state == State.RUNNING
        assert [t for t, _ in _events(running)] == []
        sup._evaluated.clear()
        sup._pass(app.records["m"], True)
        assert app.records["m"].lifecycle.state == State.ROLLED_BACK
        assert _events(running) == [("FUTILITY_STOPPED", 0), ("ROLLED_BACK", 0)]
    finally:
        running.stop(1.0)


def test_one_webhook_notifier_per_url_whatever_the_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events of one URL reach the supervisor from RPC, writer and supervisor threads at
    once: they share one notifier (another would never be closed)."""
    made: list[Any] = []

    class SlowNotifier:  # slow to build: the threads all look for it at once
        def __init__(self, url: str, **kwargs: Any) -> None:
            time.sleep(0.05)
            made.append(self)
            self.events: list[Event] = []

        def __call__(self, event: Event) -> None:
            self.events.append(event)

        def close(self, timeout: float | None = None) -> None:
            return

    monkeypatch.setattr(supervisor, "WebhookNotifier", SlowNotifier)
    running = _start_still(tmp_path)
    try:
        app, sup = running.app, running.supervisor
        spec = pb.ExperimentSpec(
            name="m",
            variants=["a", "b"],
            monitoring=pb.MonitoringSettings(webhook_url="http://127.0.0.1:9/hook"),
        )
        rec = app.create(spec)
        with sup._webhooks_lock:  # CREATED made one: start again from none
            sup._webhooks.clear()
        made.clear()
        start = threading.Barrier(8)

        def publish(i: int) -> None:
            start.wait()
            sup._on_event(rec, Event(EventType.DRIFT_DETECTED, "m", 1, float(i), "test"))

        threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(made) == 1 and len(made[0].events) == 8
    finally:
        running.stop(1.0)


def test_an_event_of_the_final_drain_still_reaches_the_webhook(
    tmp_path: Path, webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    """Stopping drains the reward queue into the monitors, which can still find a
    regression there: its events are sent before the webhooks close. One after they
    closed makes no new notifier (it would never be flushed)."""
    url, received = webhook
    running = _start_still(tmp_path)
    app, sup = running.app, running.supervisor
    with AllocatorClient(f"127.0.0.1:{running.port}", admin_token=ADMIN_TOKEN) as c:
        c.create_experiment(
            pb.ExperimentSpec(
                name="m", variants=["a", "b"], monitoring=pb.MonitoringSettings(webhook_url=url)
            )
        )
        c.promote("m", "b", reason="test")
    _wait(lambda: [r["event"] for r in received] == ["CREATED", "PROMOTED"])
    rec = app.records["m"]
    drain = app.writer.stop

    def draining() -> None:  # as a regression the monitor finds in the last rewards
        app.emit(rec, EventType.DRIFT_DETECTED, "drift in the final drain", 1)
        drain()

    app.writer.stop = draining  # type: ignore[method-assign,assignment]
    running.stop(1.0)
    assert [r["event"] for r in received] == ["CREATED", "PROMOTED", "DRIFT_DETECTED"]
    other = pb.ExperimentSpec()
    other.CopyFrom(rec.spec)
    other.monitoring.webhook_url = url + "/other"
    late = Record(rec.id, other, rec.config, rec.lifecycle, 0.0, 0.0, rec.version)
    sup._on_event(late, Event(EventType.DRIFT_DETECTED, "m", 1, 0.0, "after close"))
    assert list(sup._webhooks) == [url]


def test_a_reopened_round_is_judged_on_its_own_rewards(tmp_path: Path) -> None:
    """b was promoted on 2,000 rewards at 0.5 (a: 0.1), regressed and was reopened. On
    the pooled history the rule would promote b again at the next pass; on the round's
    own rewards it waits for min_samples, then finds a (0.3) better than b (now 0.1)."""
    running = _start_still(tmp_path)
    rng = np.random.default_rng(12)

    def send(c: AllocatorClient, tag: str, rates: dict[str, float], n: int) -> None:
        variants = list(rates) * n
        p = np.array([rates[v] for v in variants])
        values = (rng.uniform(size=p.size) < p).astype(float).tolist()
        c.reward_batch(
            "m", values, event_ids=[f"{tag}{i}" for i in range(p.size)], variants=variants
        )

    try:
        app, sup = running.app, running.supervisor
        with AllocatorClient(f"127.0.0.1:{running.port}", admin_token=ADMIN_TOKEN) as c:
            c.create_experiment(pb.ExperimentSpec(name="m", variants=["a", "b"], seed=3))
            send(c, "before", {"a": 0.1, "b": 0.5}, 2000)
            c.promote("m", "b", reason="test")
            app.transition("m", Action.REOPEN, actor="monitor", reason="regression detected")
            _wait(lambda: app.engine.view("m").reward_counts.sum() == 4000)
            sup._pass(app.records["m"], True)
            assert app.records["m"].lifecycle.state == State.REOPENED
            status = app.last_decisions["m"]
            assert status.decision == "continue"
            assert any(r.startswith("min_samples: fewest rewards 0") for r in status.reasons)
            send(c, "round", {"a": 0.3, "b": 0.1}, 1500)
            _wait(lambda: app.engine.view("m").reward_counts.sum() == 7000)
            sup._pass(app.records["m"], True)
        lc = app.records["m"].lifecycle
        assert (lc.state, lc.champion) == (State.PROMOTED, 0), app.last_decisions["m"].reasons
    finally:
        running.stop(1.0)
