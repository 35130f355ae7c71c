"""Helpers shared by every benchmark: timing, JSON, plots, the summary table, the CLI.

A benchmark module defines ``main(argv: Sequence[str] | None = None) -> int`` and uses:

* :func:`measure` to time an operation (calibrated repeats, median of the repeats), or
  :func:`measure_interleaved` for many at once, repeats in rounds (robust to load bursts);
* :func:`write_json` and :func:`machine_info` for ``results/<name>.json``;
* :func:`plot_panels` for ``results/<name>.png`` (matplotlib, Agg backend);
* :func:`update_summary` to add or replace its rows of ``results/summary.md``, keyed by
  benchmark + metric, so every benchmark joins the same table.

>>> t = measure(lambda n: sum(range(n)), repeats=3, min_time_s=0.001)
>>> t.median_ns > 0 and t.repeats == 3
True
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import json
import math
import multiprocessing as mp
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from allocator.sched import unbatch_current_thread

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SUMMARY_PATH = RESULTS_DIR / "summary.md"

# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Nanoseconds per operation over ``repeats`` timed runs of ``units`` units each.

    >>> Timing(median_ns=10.0, min_ns=9.0, max_ns=12.0, repeats=3, units=100, ops=1000).ops
    1000
    """

    median_ns: float
    min_ns: float
    max_ns: float
    repeats: int
    units: int  # calls of ``run`` per repeat (its argument)
    ops: int  # operations per repeat: units * ops_per_unit

    def __post_init__(self) -> None:
        if not (math.isfinite(self.median_ns) and self.median_ns >= 0):
            raise ValueError(f"median_ns must be finite and >= 0, got {self.median_ns!r}")
        if not self.min_ns <= self.median_ns <= self.max_ns:
            raise ValueError("need min_ns <= median_ns <= max_ns")
        if self.repeats < 1 or self.units < 1 or self.ops < 1:
            raise ValueError("repeats, units and ops must be >= 1")

    def to_dict(self) -> dict[str, float | int]:
        """Plain data for JSON."""
        return {
            "median_ns": self.median_ns,
            "min_ns": self.min_ns,
            "max_ns": self.max_ns,
            "repeats": self.repeats,
            "ops_per_repeat": self.ops,
        }


def _elapsed_ns(run: Callable[[int], object], units: int) -> int:
    start = time.perf_counter_ns()
    run(units)
    return time.perf_counter_ns() - start


def _check(repeats: int, min_time_s: float, ops_per_unit: int, max_units: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not (math.isfinite(min_time_s) and min_time_s >= 0):
        raise ValueError(f"min_time_s must be finite and >= 0, got {min_time_s!r}")
    if ops_per_unit < 1 or max_units < 1:
        raise ValueError("ops_per_unit and max_units must be >= 1")


def calibrate(run: Callable[[int], object], min_time_s: float, max_units: int = 10_000_000) -> int:
    """Units of ``run`` that take at least ``min_time_s`` (after one untimed warm-up call)."""
    _check(1, min_time_s, 1, max_units)
    run(1)
    target_ns = min_time_s * 1e9
    units = 1
    elapsed = _elapsed_ns(run, units)
    while elapsed < target_ns and units < max_units:
        # Aim 20% past the target; grow at most 100x per step in case the first run was
        # abnormally fast (a cache hit that a larger run will not enjoy).
        factor = min(100.0, 1.2 * target_ns / max(elapsed, 1))
        units = min(max_units, max(units + 1, math.ceil(units * factor)))
        elapsed = _elapsed_ns(run, units)
    return units


def _timing(per_op: list[float], units: int, ops: int) -> Timing:
    per_op = sorted(per_op)
    return Timing(
        median_ns=float(statistics.median(per_op)),
        min_ns=per_op[0],
        max_ns=per_op[-1],
        repeats=len(per_op),
        units=units,
        ops=ops,
    )


def measure(
    run: Callable[[int], object],
    *,
    repeats: int = 5,
    min_time_s: float = 0.05,
    ops_per_unit: int = 1,
    max_units: int = 10_000_000,
) -> Timing:
    """Time ``run(units)`` (which performs ``units`` units of ``ops_per_unit`` operations).

    ``units`` is calibrated so one run takes ``min_time_s`` (timer resolution and loop
    start-up become negligible), then ``repeats`` timed runs. The median is reported: on a
    shared machine the noise is one-sided (preemption only adds time), and the median
    ignores a minority of disturbed repeats.
    """
    return measure_interleaved(
        [(run, ops_per_unit)], repeats=repeats, min_time_s=min_time_s, max_units=max_units
    )[0]


def measure_interleaved(
    tasks: Sequence[tuple[Callable[[int], object], int]],
    *,
    repeats: int = 5,
    min_time_s: float = 0.05,
    max_units: int = 10_000_000,
) -> list[Timing]:
    """Like :func:`measure` for several ``(run, ops_per_unit)`` tasks, repeats in rounds.

    Each round times every task once, so a burst of load from another process disturbs one
    repeat of many tasks (which the median drops) rather than every repeat of a few.
    """
    _check(repeats, min_time_s, min((o for _, o in tasks), default=1), max_units)
    units = [calibrate(run, min_time_s, max_units) for run, _ in tasks]
    per_op: list[list[float]] = [[] for _ in tasks]
    for _ in range(repeats):
        for i, (run, ops_per_unit) in enumerate(tasks):
            per_op[i].append(_elapsed_ns(run, units[i]) / (units[i] * ops_per_unit))
    return [_timing(p, u, u * o) for p, u, (_, o) in zip(per_op, units, tasks, strict=True)]


# ----------------------------------------------------------------------------------------
# Client processes: load generators that don't share the server's GIL
# ----------------------------------------------------------------------------------------


def _client_loop(conn: Connection, task: Callable[..., dict[str, Any]]) -> None:
    """Spawned client: ``task(*args, mark)`` per request until ``None`` arrives.

    ``mark()`` sends ("mark", None) when the task's clock starts; then ("ok", stats) or
    ("error", repr) follows.
    """
    # The client stands in for other machines' processes: default scheduling, whatever
    # the parent (a server that gives its threads SCHED_BATCH) runs with. Threads it
    # starts inherit this.
    unbatch_current_thread()
    while True:
        msg = conn.recv()
        if msg is None:
            return
        try:
            stats = task(*msg, lambda: conn.send(("mark", None)))
            conn.send(("ok", stats))
        except Exception as err:  # sent back to the parent
            conn.send(("error", repr(err)))


class ClientProcess:
    """A spawned process running ``task(*args, mark)`` on request; a context manager.

    ``task`` must be a module-level function (spawn pickles it by name). ``start`` a task,
    ``wait_mark`` until its clock starts (connected, tokens drawn), then ``result``.
    """

    def __init__(self, task: Callable[..., dict[str, Any]]) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_client_loop, args=(child, task), daemon=True)
        self._proc.start()
        child.close()
        self._marked = False

    def start(self, *args: Any) -> None:
        """Send a task; returns at once."""
        self._marked = False
        self._conn.send(args)

    def wait_mark(self) -> None:
        """Block until the running task starts its clock."""
        if self._marked:
            return
        status, payload = self._conn.recv()
        if status != "mark":
            raise RuntimeError(f"client task failed before starting: {payload}")
        self._marked = True

    def result(self) -> dict[str, Any]:
        """Block until the running task finishes; its statistics."""
        self.wait_mark()
        status, payload = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"client task failed: {payload}")
        return dict(payload)

    def run(self, *args: Any) -> dict[str, Any]:
        """Start a task and wait for its result."""
        self.start(*args)
        return self.result()

    def close(self) -> None:
        """Ask the child to exit and wait for it."""
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()

    def __enter__(self) -> ClientProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------
# Machine and JSON
# ----------------------------------------------------------------------------------------


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name from /proc/cpuinfo, else whatever platform knows."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=BENCH_DIR,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def machine_info(packages: Sequence[str] = ("numpy", "numba")) -> dict[str, Any]:
    """Where and when a result was measured: CPU, cores, load, versions, git commit."""
    load: list[float] | None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "load_average_1_5_15": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in packages},
        "git_commit": _git_commit(),
        "measured_at": utc_now(),
    }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One line of a plot; ``style`` is a matplotlib line style ("-", "--", ":")."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "-"
    marker: str = "o"

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"{self.label!r}: {len(self.x)} x values for {len(self.y)} y values")


@dataclass(frozen=True)
class Panel:
    """One set of axes: its series, labels and scales."""

    title: str
    xlabel: str
    ylabel: str
    series: Sequence[Series] = field(default_factory=tuple)
    logx: bool = True
    logy: bool = True
    hlines: Sequence[tuple[float, str]] = field(default_factory=tuple)  # (y, label): targets


def plot_panels(path: Path, panels: Sequence[Panel], title: str = "") -> None:
    """Draw ``panels`` side by side into a PNG at ``path`` (Agg backend: no display needed)."""
    if not panels:
        raise ValueError("plot_panels needs at least one panel")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    most = max(len(p.series) for p in panels)
    rows_of_legend = math.ceil(most / 2)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6.5 * len(panels), 5.0 + 0.16 * rows_of_legend), squeeze=False
    )
    # tab20 keeps up to 20 lines apart; the default cycle repeats after 10.
    cmap = plt.get_cmap("tab20" if most > 10 else "tab10")
    for ax, panel in zip(axes[0], panels, strict=True):
        for i, s in enumerate(panel.series):
            ax.plot(
                s.x,
                s.y,
                linestyle=s.style,
                marker=s.marker,
                markersize=4,
                label=s.label,
                color=cmap(i % cmap.N),
            )
        for y, label in panel.hlines:
            ax.axhline(y, color="grey", linestyle=":", linewidth=1)
            ax.annotate(
                label,
                (0.01, y),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                color="grey",
                va="bottom",
            )
        if panel.logx:
            ax.set_xscale("log")
        if panel.logy:
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if panel.series:
            ax.legend(
                fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False
            )
    if title:
        fig.suptitle(title, fontsize=11)
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write ``path`` (parents created) at the benchmarks' resolution, and close."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Summary table (results/summary.md)
# ----------------------------------------------------------------------------------------

_COLUMNS = ("benchmark", "metric", "value", "unit", "target", "met", "notes", "updated")
_HEADER = (
    "# Benchmark summary\n\n"
    "One row per benchmark + metric; each benchmark replaces its own rows when it runs\n"
    "(`python -m benchmarks.run_all`). Details and baselines: `results/<benchmark>.json`.\n\n"
)
_SPLIT = re.compile(r"(?<!\\)\|")


@dataclass(frozen=True)
class SummaryRow:
    """One line of the summary table; ``met`` is None when there is no target.

    >>> SummaryRow("core", "batch ns/decision K=10", "240", "ns", "<= 300", True).key
    ('core', 'batch ns/decision K=10')
    """

    benchmark: str
    metric: str
    value: str
    unit: str = ""
    target: str = ""
    met: bool | None = None
    notes: str = ""
    updated: str = ""

    def __post_init__(self) -> None:
        if not self.benchmark.strip() or not self.metric.strip():
            raise ValueError("benchmark and metric must be non-empty")
        for name in ("benchmark", "metric", "value", "unit", "target", "notes", "updated"):
            if "\n" in getattr(self, name):
                raise ValueError(f"{name} must be one line")

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the row across runs."""
        return (self.benchmark, self.metric)

    def cells(self) -> list[str]:
        """The row's cells, in column order, pipes escaped."""
        met = "" if self.met is None else ("yes" if self.met else "**no**")
        raw = [
            self.benchmark,
            self.metric,
            self.value,
            self.unit,
            self.target,
            met,
            self.notes,
            self.updated,
        ]
        return [c.replace("|", "\\|") for c in raw]


def target_entry(
    name: str,
    description: str,
    measured: float | None,
    comparison: str,
    target: float,
    unit: str,
    detail: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One entry of a benchmark's ``targets`` list; ``met`` is None when not measured."""
    met = (
        None
        if measured is None
        else (measured <= target if comparison == "<=" else measured >= target)
    )
    out: dict[str, Any] = {
        "name": name,
        "description": description,
        "measured": measured,
        "unit": unit,
        "comparison": comparison,
        "target": target,
        "met": met,
    }
    if detail is not None:
        out["detail"] = dict(detail)
    return out


def target_rows(
    benchmark: str,
    targets: Sequence[Mapping[str, Any]],
    *,
    label: str = "name",
    missing: str = "n/a",
) -> list[SummaryRow]:
    """Summary rows for a benchmark's ``targets`` list (name, measured, unit, comparison,
    target, met): the metric is ``t[label]``, an unmeasured value reads ``missing``."""
    rows = []
    for t in targets:
        value = missing if t["measured"] is None else format_value(t["measured"])
        rows.append(
            SummaryRow(
                benchmark,
                t[label],
                value,
                t["unit"],
                f"{t['comparison']} {format_value(t['target'])}",
                t["met"],
            )
        )
    return rows


def print_targets(targets: Sequence[Mapping[str, Any]]) -> None:
    """One line per target: measured value, the target, and met / NOT met / not measured."""
    for t in targets:
        value = "n/a" if t["measured"] is None else format_value(t["measured"])
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(
            f"{t['name']}: {value} {t['unit']} (target {t['comparison']} "
            f"{format_value(t['target'])}): {verdict}"
        )


def format_value(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, without scientific notation below 1e9."""
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{round(x, decimals):,.{decimals}f}"


def _parse_row(line: str) -> SummaryRow | None:
    cells = [c.strip().replace("\\|", "|") for c in _SPLIT.split(line.strip())[1:-1]]
    if len(cells) != len(_COLUMNS) or cells[0] in ("benchmark", "") or set(cells[0]) <= {"-"}:
        return None
    met = {"yes": True, "**no**": False, "no": False}.get(cells[5])
    return SummaryRow(cells[0], cells[1], cells[2], cells[3], cells[4], met, cells[6], cells[7])


def read_summary(path: Path = SUMMARY_PATH) -> list[SummaryRow]:
    """The rows of an existing summary table, in file order (none if there is no file)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("|"):
            row = _parse_row(line)
            if row is not None:
                rows.append(row)
    return rows


def render_summary(rows: Sequence[SummaryRow]) -> str:
    """The whole summary.md text for ``rows``."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return _HEADER + "\n".join(lines) + "\n"


def merge_rows(
    old: Sequence[SummaryRow], new: Sequence[SummaryRow], *, replace_benchmarks: bool = False
) -> list[SummaryRow]:
    """``old`` with ``new`` rows replacing those of the same key, in place; new keys go after
    the last row of their benchmark. With ``replace_benchmarks``, rows of a benchmark in
    ``new`` whose metric is no longer reported are dropped."""
    new_keys = {r.key for r in new}
    if len(new_keys) != len(new):
        raise ValueError("new summary rows repeat a benchmark + metric")
    by_key = {r.key: r for r in new}
    benches = {r.benchmark for r in new}
    out: list[SummaryRow] = []
    placed: set[tuple[str, str]] = set()
    for r in old:
        if r.key in by_key:
            if r.key not in placed:
                out.append(by_key[r.key])
                placed.add(r.key)
        elif not (replace_benchmarks and r.benchmark in benches):
            out.append(r)
    for r in new:
        if r.key in placed:
            continue
        last = max((i for i, o in enumerate(out) if o.benchmark == r.benchmark), default=None)
        if last is None:
            out.append(r)
        else:
            out.insert(last + 1, r)
        placed.add(r.key)
    return out


def update_summary(
    rows: Sequence[SummaryRow], path: Path = SUMMARY_PATH, *, replace_benchmarks: bool = False
) -> None:
    """Add or replace ``rows`` in the summary table at ``path`` (created if missing)."""
    stamped = [r if r.updated else _with_updated(r, utc_now()) for r in rows]
    merged = merge_rows(read_summary(path), stamped, replace_benchmarks=replace_benchmarks)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_summary(merged))
    os.replace(tmp, path)


def _with_updated(row: SummaryRow, when: str) -> SummaryRow:
    return SummaryRow(
        row.benchmark, row.metric, row.value, row.unit, row.target, row.met, row.notes, when
    )


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick, --json, --png, --summary."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run")
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS_DIR / f"{name}.json",
        help="where to write the JSON results (default: %(default)s)",
    )
    parser.add_argument(
        "--png",
        type=Path,
        default=RESULTS_DIR / f"{name}.png",
        help="where to write the plot (default: %(default)s)",
    )
    parser.add_argument(
        "--summary",
        type=Path,
        default=SUMMARY_PATH,
        help="summary table to update (default: %(default)s)",
    )
    parser.add_argument("--no-summary", action="store_true", help="leave the summary table alone")
    return parser
