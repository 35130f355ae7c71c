"""benchmarks.service: a tiny end-to-end run (JSON schema, plot) and its pure helpers.

No wall-clock assertions: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.service import (
    SCENARIOS,
    Samples,
    ServiceSettings,
    _mean_rounds,
    _pool,
    evaluate_targets,
    histogram_quantile,
    main,
)

TARGET_NAMES = {
    "assign_unary_throughput_vs_echo",
    "assign_unary_p99_vs_echo",
    "assign_batch_decisions_per_s",
    "assign_stream_decisions_per_s",
    "server_decision_p99_us",
}


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def test_tiny_run_writes_json_and_png(tmp_path: Path) -> None:
    out, png = tmp_path / "service.json", tmp_path / "service.png"
    # Warm-up 0: every completed call is measured, so even a 0.2 s phase has samples.
    status = main(
        [
            "--quick",
            "--duration", "0.2",
            "--warmup", "0",
            "--inflight", "4",
            "--batch", "500",
            "--max-reward-batches", "3",
            "--rounds", "1",
            "--json", str(out),
            "--png", str(png),
            "--no-summary",
        ]
    )  # fmt: skip
    assert status == 0
    doc = json.loads(out.read_text())
    assert [r["name"] for r in doc["results"]] == list(SCENARIOS)
    for r in doc["results"]:
        assert r["errors"] == 0, r["first_error"]
        assert r["calls"] >= 1
        for key in ("per_s", "decisions_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_call"):
            assert _number(r[key]) and r[key] > 0, (r["name"], key, r[key])
        assert r["p50_ms"] <= r["p99_ms"]
        per_call = 1 if r["name"] in ("echo_unary", "assign_unary") else 500
        assert r["decisions_per_s"] == pytest.approx(r["per_s"] * per_call)
    by = {r["name"]: r for r in doc["results"]}
    assert "server_decision" not in by["echo_unary"]
    assert by["assign_unary"]["server_decision"]["observations"] >= by["assign_unary"]["calls"]
    assert by["reward_batch"]["tokens_drawn"] == 3
    assert _number(doc["server_decision_p99_us"]) and doc["server_decision_p99_us"] > 0
    assert {t["name"] for t in doc["targets"]} == TARGET_NAMES
    for t in doc["targets"]:
        assert _number(t["measured"]) and isinstance(t["met"], bool)
        above = t["measured"] >= t["target"]
        assert t["met"] == (above if t["comparison"] == ">=" else t["measured"] <= t["target"])
    assert "logical CPUs" in doc["setup"]["shared_machine"]
    assert doc["settings"]["inflight"] == 4 and doc["settings"]["batch"] == 500
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_phase_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--phases", "assign_unary,nope", "--json", str(tmp_path / "x.json")])
    assert exc.value.code == 2
    assert not (tmp_path / "x.json").exists()


def test_bad_settings_are_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--batch", "0", "--json", str(tmp_path / "x.json")])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("duration_s", 0.0, "duration_s"),
        ("duration_s", math.inf, "duration_s"),
        ("warmup_s", -1.0, "warmup_s"),
        ("batch", 0, "batch"),
        ("batch", 100_001, "batch"),
        ("inflight", 0, "in-flight"),
        ("stream_inflight", 0, "in-flight"),
        ("n_arms", 1, "n_arms"),
        ("rounds", 0, "rounds"),
        ("max_reward_batches", 0, "max_reward_batches"),
    ],
)
def test_settings_reject_bad_values(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServiceSettings(**{field: value})  # type: ignore[arg-type]


def test_settings_defaults_are_valid() -> None:
    s = ServiceSettings()
    assert s.batch == 10_000 and s.n_arms == 10 and s.max_workers == 16


BOUNDS = (1e-6, 2e-6, 5e-6, 1e-5, math.inf)


def _snapshot(counts: list[float]) -> list[tuple[float, float]]:
    """Cumulative bucket snapshot from per-bucket counts."""
    return list(zip(BOUNDS, np.cumsum(counts).tolist(), strict=True))


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    before = _snapshot([0, 0, 0, 0, 0])
    after = _snapshot([10, 40, 40, 10, 0])  # 100 observations
    # Rank 50 is the 40th of 40 in (1e-6, 2e-6]: 1e-6 + 1e-6 * 40/40.
    assert histogram_quantile(before, after, 0.5) == pytest.approx(2e-6)
    # Rank 99 is the 9th of 10 in (5e-6, 1e-5]: 5e-6 + 5e-6 * 9/10.
    assert histogram_quantile(before, after, 0.99) == pytest.approx(9.5e-6)
    # Rank 5 is the 5th of 10 in the first bucket, interpolated from 0.
    assert histogram_quantile(before, after, 0.05) == pytest.approx(0.5e-6)


def test_histogram_quantile_uses_only_the_difference() -> None:
    before = _snapshot([0, 0, 0, 1000, 0])
    after = _snapshot([0, 100, 0, 1000, 0])
    assert histogram_quantile(before, after, 0.99) == pytest.approx(1e-6 + 1e-6 * 0.99)


def test_histogram_quantile_in_the_inf_bucket_is_its_lower_bound() -> None:
    assert histogram_quantile(_snapshot([0] * 5), _snapshot([1, 0, 0, 0, 99]), 0.5) == 1e-5


def test_histogram_quantile_of_nothing_is_none() -> None:
    assert histogram_quantile(_snapshot([1] * 5), _snapshot([1] * 5), 0.99) is None
    assert histogram_quantile([], [], 0.5) is None


def test_rounds_pool_their_bucket_differences() -> None:
    # Round 1 adds (1, 2, 0, 0, 0) observations, round 2 adds (0, 0, 3, 0, 0).
    r1 = (_snapshot([5, 0, 0, 0, 0]), _snapshot([6, 2, 0, 0, 0]))
    r2 = (_snapshot([6, 2, 0, 0, 0]), _snapshot([6, 2, 3, 0, 0]))
    before, after = _pool([r1, r2])
    assert [c for _, c in before] == [0.0] * 5
    assert [c for _, c in after] == [1.0, 3.0, 6.0, 6.0, 6.0]


def test_rounds_average_rates_sum_counts_and_keep_the_items_per_call() -> None:
    merged = _mean_rounds(
        [
            {"per_s": 2.0, "calls": 10, "items_per_call": 1, "p99_ms": 1.0},
            {"per_s": 4.0, "calls": 30, "items_per_call": 1, "p99_ms": 3.0},
        ]
    )
    assert merged["per_s"] == 3.0 and merged["p99_ms"] == 2.0
    assert merged["calls"] == 40
    assert merged["items_per_call"] == 1  # was summed: 4 in a 4-round run
    with pytest.raises(ValueError, match="items_per_call differs"):
        _mean_rounds([{"items_per_call": 1}, {"items_per_call": 2}])


@pytest.mark.parametrize("q", [0.0, 1.0, -0.1, 1.5])
def test_histogram_quantile_rejects_q_outside_0_1(q: float) -> None:
    with pytest.raises(ValueError, match="q must be"):
        histogram_quantile([], [], q)


def test_samples_stats_skip_the_warmup() -> None:
    # Calls end at 0.5, 1.0, 1.5, 2.0 s; measuring from 1.0 s keeps the last three, over
    # a 1.0 s window (1.0 -> 2.0 s).
    ends = np.array([0.5e9, 1.0e9, 1.5e9, 2.0e9], dtype=np.int64)
    lats = np.array([9e6, 1e6, 2e6, 3e6], dtype=np.int64)
    stats = Samples(ends, lats, started_ns=0, measure_from_ns=int(1e9), cpu_s=1.0).stats(10)
    assert stats["calls"] == 3 and stats["total_calls"] == 4
    assert stats["per_s"] == pytest.approx(3.0)
    assert stats["decisions_per_s"] == pytest.approx(30.0)
    assert stats["p50_ms"] == pytest.approx(2.0)
    assert stats["client_cpu_cores"] == pytest.approx(0.5)
    assert stats["client_cpu_us_per_call"] == pytest.approx(250_000.0)


def test_samples_stats_without_calls() -> None:
    empty = np.array([], dtype=np.int64)
    stats = Samples(empty, empty, 0, 0, 0.0, ("boom",)).stats(1)
    assert stats["calls"] == 0 and stats["per_s"] == 0.0 and stats["p99_ms"] is None
    assert stats["errors"] == 1 and stats["first_error"] == "boom"


def test_evaluate_targets() -> None:
    results = [
        {"name": "echo_unary", "per_s": 1000.0, "p99_ms": 10.0, "decisions_per_s": 1000.0},
        {"name": "assign_unary", "per_s": 900.0, "p99_ms": 25.0, "decisions_per_s": 900.0},
        {"name": "assign_batch", "per_s": 200.0, "p99_ms": 5.0, "decisions_per_s": 2e6},
    ]
    got = {t["name"]: t for t in evaluate_targets(results, 12.0)}
    assert got["assign_unary_throughput_vs_echo"]["measured"] == pytest.approx(0.9)
    assert got["assign_unary_throughput_vs_echo"]["met"] is True
    assert got["assign_unary_p99_vs_echo"]["measured"] == pytest.approx(2.5)
    assert got["assign_unary_p99_vs_echo"]["met"] is False
    assert got["assign_batch_decisions_per_s"]["met"] is True
    assert got["assign_stream_decisions_per_s"]["measured"] is None
    assert got["assign_stream_decisions_per_s"]["met"] is None
    assert got["server_decision_p99_us"]["met"] is True
    assert {t["name"] for t in evaluate_targets([], None)} == TARGET_NAMES
