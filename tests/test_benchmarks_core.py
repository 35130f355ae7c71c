"""Benchmarks: core runs end to end in a tiny configuration; the shared helpers behave.

No wall-clock assertions: timings are only checked to be positive and finite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import core, run_all
from benchmarks.common import (
    Panel,
    Series,
    SummaryRow,
    Timing,
    format_value,
    measure,
    measure_interleaved,
    merge_rows,
    plot_panels,
    read_summary,
    update_summary,
)

TINY = ["--ks", "2,10", "--repeats", "1", "--min-time", "0", "--batch", "200"]


@pytest.fixture(scope="module")
def core_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    out = tmp_path_factory.mktemp("core")
    argv = [
        *TINY,
        "--json",
        str(out / "core.json"),
        "--png",
        str(out / "core.png"),
        "--summary",
        str(out / "summary.md"),
    ]
    assert core.main(argv) == 0
    return out, json.loads((out / "core.json").read_text())


def _positive(x: object) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


def test_core_json_schema(core_run: tuple[Path, dict[str, object]]) -> None:
    _, doc = core_run
    results = doc["results"]
    assert isinstance(results, list) and results
    for row in results:
        assert {
            "policy",
            "k",
            "mode",
            "ns_per_decision",
            "baseline",
            "baseline_ns_per_decision",
        } <= row.keys()
        assert row["k"] in (2, 10)
        assert row["mode"] in ("single", "batch", "table")
        assert row["baseline"] in ("numpy", "mabwiser")
        assert _positive(row["ns_per_decision"]) and _positive(row["baseline_ns_per_decision"])
    engine = {
        (r["policy"], r["mode"], r["k"], r["baseline"]) for r in results if r["path"] == "engine"
    }
    for k in (2, 10):
        for policy in core.POLICIES:
            assert (policy, "single", k, "numpy") in engine
            batch_mode = "table" if policy in core.TABLE_SERVED else "batch"
            assert (policy, batch_mode, k, "numpy") in engine
        assert ("thompson", "batch", k, "mabwiser") in engine
        assert ("table", "table", k, "mabwiser") in engine
    kernel = {(r["policy"], r["mode"]) for r in results if r["path"] == "kernel"}
    assert kernel == {("thompson", "single"), ("thompson", "batch"), ("table", "table")}
    updates = doc["updates"]
    assert isinstance(updates, list)
    assert {(u["mode"], u["baseline"]) for u in updates} >= {
        ("reward_single", "numpy"),
        ("reward_single", "mabwiser"),
        ("reward_batch", "numpy"),
        ("reward_batch", "mabwiser"),
    }
    assert all(_positive(u["ns_per_reward"]) for u in updates)


def test_core_targets_machine_and_numba_reference(
    core_run: tuple[Path, dict[str, object]],
) -> None:
    _, doc = core_run
    targets = {t["name"]: t for t in doc["targets"]}  # type: ignore[attr-defined]
    assert set(targets) == {
        "exact_thompson_batch_k10",
        "table_mode_max_k_le_1000",
        "single_assign_k10",
        "speedup_vs_mabwiser_batch_k10",
    }
    for t in targets.values():
        assert _positive(t["measured"]) and isinstance(t["met"], bool)
    assert set(targets["table_mode_max_k_le_1000"]["detail"]["engine_ns_by_k"]) == {"2", "10"}
    machine = doc["machine"]
    assert isinstance(machine, dict) and machine["cpu_model"] and machine["packages"]["numba"]
    names = {(m["name"], m["mode"]) for m in doc["measurements"]}  # type: ignore[attr-defined]
    assert {("numba_np_beta", "batch"), ("engine_refresh", "refresh")} <= names


def test_core_writes_png_and_summary(core_run: tuple[Path, dict[str, object]]) -> None:
    out, _ = core_run
    assert (out / "core.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_summary(out / "summary.md")
    assert rows and all(r.benchmark == "core" for r in rows)
    assert sum(r.met is not None for r in rows) == 4


def test_core_targets_not_measured_without_k10() -> None:
    timing = Timing(5.0, 5.0, 5.0, 1, 1, 1)
    only_k2 = [core.Measured("thompson", "engine", "batch", 2, 1, timing, "x")]
    targets = core.evaluate_targets(only_k2)
    assert len(targets) == 4
    assert all(t["measured"] is None and t["met"] is None for t in targets)


def test_core_settings_validate() -> None:
    assert core.CoreSettings(ks=(2, 10)).exact_batch(1000) == 2000
    with pytest.raises(ValueError, match="ks"):
        core.CoreSettings(ks=(1,))
    with pytest.raises(ValueError, match="ks"):
        core.CoreSettings(ks=())
    with pytest.raises(ValueError, match="repeats"):
        core.CoreSettings(repeats=0)
    with pytest.raises(ValueError, match="min_time_s"):
        core.CoreSettings(min_time_s=-1.0)
    with pytest.raises(ValueError, match="batch"):
        core.CoreSettings(batch=200_000)
    with pytest.raises(ValueError, match="max_draws"):
        core.CoreSettings(max_draws=10)
    with pytest.raises(ValueError, match="mabwiser_batch"):
        core.CoreSettings(mabwiser_batch=0)
    with pytest.raises(ValueError, match="prior_rewards"):
        core.CoreSettings(prior_rewards=0)


def test_core_main_rejects_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        core.main(["--ks", "1,5000", "--json", str(tmp_path / "x.json")])
    assert exc.value.code == 2
    assert "ks must be" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# -- common: timing ----------------------------------------------------------------------


def test_measure_counts_calls_and_reports_per_op() -> None:
    calls: list[int] = []
    t = measure(calls.append, repeats=3, min_time_s=0.0, ops_per_unit=10)
    # Warm-up, one calibration run, three repeats, each of one unit (min_time 0 needs no more).
    assert calls == [1, 1, 1, 1, 1]
    assert t.repeats == 3 and t.units == 1 and t.ops == 10
    assert t.min_ns <= t.median_ns <= t.max_ns


def test_measure_grows_units_to_reach_min_time() -> None:
    t = measure(lambda n: sum(range(n)), repeats=1, min_time_s=0.001, max_units=10**9)
    assert t.units > 1


def test_measure_interleaved_times_tasks_in_rounds() -> None:
    log: list[str] = []
    timings = measure_interleaved(
        [(lambda n: log.append("a"), 1), (lambda n: log.append("b"), 4)],
        repeats=3,
        min_time_s=0.0,
    )
    # Each task: warm-up + calibration run; then three rounds a, b.
    assert log == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]
    assert [t.ops for t in timings] == [1, 4]
    with pytest.raises(ValueError, match="ops_per_unit"):
        measure_interleaved([(lambda n: None, 0)])


def test_measure_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda n: None, repeats=0)
    with pytest.raises(ValueError, match="min_time_s"):
        measure(lambda n: None, min_time_s=math.nan)
    with pytest.raises(ValueError, match="ops_per_unit"):
        measure(lambda n: None, ops_per_unit=0)


def test_timing_validates() -> None:
    assert Timing(2.0, 1.0, 3.0, 1, 1, 1).to_dict()["median_ns"] == 2.0
    with pytest.raises(ValueError, match="min_ns"):
        Timing(5.0, 6.0, 7.0, 1, 1, 1)
    with pytest.raises(ValueError, match="median_ns"):
        Timing(math.inf, 1.0, math.inf, 1, 1, 1)
    with pytest.raises(ValueError, match=">= 1"):
        Timing(1.0, 1.0, 1.0, 0, 1, 1)


def test_format_value() -> None:
    assert format_value(267.449) == "267"
    assert format_value(13.61) == "13.6"
    assert format_value(0.012345) == "0.0123"
    assert format_value(12345.6) == "12,346"
    assert format_value(0.0) == "0"
    assert format_value(math.inf) == "inf"


# -- common: summary table ---------------------------------------------------------------


def _r(bench: str, metric: str, value: str = "1", **kw: object) -> SummaryRow:
    return SummaryRow(bench, metric, value, **kw)  # type: ignore[arg-type]


def test_merge_replaces_in_place_and_groups_new_rows_by_benchmark() -> None:
    old = [_r("core", "a"), _r("core", "b"), _r("service", "x")]
    merged = merge_rows(old, [_r("core", "b", "2"), _r("core", "c"), _r("durability", "d")])
    assert [(r.benchmark, r.metric, r.value) for r in merged] == [
        ("core", "a", "1"),
        ("core", "b", "2"),
        ("core", "c", "1"),
        ("service", "x", "1"),
        ("durability", "d", "1"),
    ]


def test_merge_replace_benchmarks_drops_stale_rows_of_that_benchmark_only() -> None:
    old = [_r("core", "stale"), _r("service", "x"), _r("core", "kept")]
    merged = merge_rows(old, [_r("core", "kept", "9")], replace_benchmarks=True)
    assert [(r.benchmark, r.metric, r.value) for r in merged] == [
        ("service", "x", "1"),
        ("core", "kept", "9"),
    ]


def test_merge_rejects_duplicate_keys() -> None:
    with pytest.raises(ValueError, match="repeat"):
        merge_rows([], [_r("core", "a"), _r("core", "a", "2")])


def test_update_summary_round_trips_and_keeps_other_benchmarks(tmp_path: Path) -> None:
    path = tmp_path / "summary.md"
    assert read_summary(path) == []
    update_summary([_r("service", "p99 | latency", "3", unit="ms", target="<= 5", met=True)], path)
    update_summary([_r("core", "batch", "250", met=False, notes="noisy")], path)
    update_summary([_r("core", "batch", "240", met=True)], path)
    rows = read_summary(path)
    assert [(r.benchmark, r.metric, r.value, r.met) for r in rows] == [
        ("service", "p99 | latency", "3", True),
        ("core", "batch", "240", True),
    ]
    assert rows[0].unit == "ms" and rows[0].target == "<= 5" and rows[0].updated
    assert path.read_text().startswith("# Benchmark summary")


def test_summary_row_validates() -> None:
    assert _r("core", "m").key == ("core", "m")
    with pytest.raises(ValueError, match="non-empty"):
        _r(" ", "m")
    with pytest.raises(ValueError, match="one line"):
        _r("core", "m", "1\n2")


# -- common: plots -----------------------------------------------------------------------


def test_plot_panels_writes_png_and_rejects_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    plot_panels(
        path,
        [Panel("t", "x", "y", [Series("s", [1, 10], [5.0, 50.0])], hlines=((20.0, "target"),))],
    )
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="at least one panel"):
        plot_panels(path, [])
    with pytest.raises(ValueError, match="2 x values for 1 y"):
        Series("s", [1, 2], [1.0])


# -- run_all -----------------------------------------------------------------------------


def test_discover_finds_modules_with_main_only(tmp_path: Path) -> None:
    assert "core" in run_all.discover()
    assert not {"common", "run_all", "__init__"} & set(run_all.discover())
    (tmp_path / "zeta.py").write_text("def main(argv=None):\n    return 0\n")
    (tmp_path / "alpha.py").write_text("def main(argv=None):\n    return 0\n")
    (tmp_path / "core.py").write_text("def main(argv=None):\n    return 0\n")
    (tmp_path / "helper.py").write_text("def run():\n    pass\n")
    (tmp_path / "broken.py").write_text("def main(:\n")
    (tmp_path / "_private.py").write_text("def main(argv=None):\n    return 0\n")
    (tmp_path / "common.py").write_text("def main(argv=None):\n    return 0\n")
    assert run_all.discover(tmp_path) == ["core", "alpha", "zeta"]


def test_run_all_list_and_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_all.main(["--list"]) == 0
    assert "core" in capsys.readouterr().out.split()
    with pytest.raises(SystemExit) as exc:
        run_all.main(["--only", "no_such_benchmark"])
    assert exc.value.code == 2
    assert "unknown benchmark" in capsys.readouterr().err
