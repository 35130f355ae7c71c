"""Off-policy replay against the log of a real server run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from allocator_client import AllocatorClient
from allocator_client.v1 import allocator_pb2 as pb
from prometheus_client import CollectorRegistry

from allocator.cli import main as cli_main
from allocator.policies import PolicyConfig, PolicyKind
from allocator.replay import replay
from allocator.server import create_server
from allocator.store import SqlStore
from tests.conftest import server_config

RATES = np.array([0.10, 0.20, 0.30])


def _logged_run(db: Path) -> None:
    running = create_server(server_config(f"sqlite:///{db}"), registry=CollectorRegistry())
    rng = np.random.default_rng(8)
    try:
        with AllocatorClient(f"127.0.0.1:{running.port}") as c:
            # TABLE mode: the logged propensities are exactly the shares decisions used.
            c.create_experiment(
                pb.ExperimentSpec(
                    name="r",
                    variants=["a", "b", "c"],
                    seed=5,
                    allocation_mode=pb.ALLOCATION_MODE_TABLE,
                    table_refresh_rewards=300,
                    traffic=pb.TrafficSettings(floor=0.05),
                )
            )
            for _ in range(30):
                b = c.assign_batch("r", 400)
                arms = np.array(b.variant_indices)
                values = (rng.uniform(size=arms.size) < RATES[arms]).astype(float)
                # Every outcome is reported except a random 10%, lost on the way: the
                # replay divides by the logged decision count, so a lost reward counts as 0.
                idx = [i for i in range(arms.size) if rng.uniform() < 0.9]
                c.reward_batch(
                    "r", [float(values[i]) for i in idx], batch_token=b.batch_token, indices=idx
                )
    finally:
        running.stop(1.0)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One logged run shared by the tests (replay only reads it)."""
    path = tmp_path_factory.mktemp("replay") / "log.sqlite"
    _logged_run(path)
    return path


def test_replay_estimates_a_uniform_policy_without_bias(db: Path) -> None:
    store = SqlStore.open(f"sqlite:///{db}")
    try:
        uniform = PolicyConfig(kind=PolicyKind.FIXED_SPLIT)
        result = replay(store, "r", uniform, threshold=0.95)
    finally:
        store.close()
    assert result.decisions == 12_000
    # A uniform policy earns the mean of the true rates, 0.2, times the 90% of rewards that
    # arrive. The IPS estimate is unbiased for that and reports its standard error; 4 se
    # is a 6e-5 two-sided miss rate.
    assert abs(result.candidate_value - 0.9 * RATES.mean()) < 4 * result.candidate_se
    assert result.candidate_se < 0.01
    # The logged (adaptive) policy earned more than uniform: it found arm c.
    assert result.logged_value > 0.9 * RATES.mean()
    assert result.promoted_variant == "c" and result.promoted_at is not None
    assert 0 < result.effective_sample_size <= result.rewards


def test_stricter_threshold_promotes_later(db: Path) -> None:
    store = SqlStore.open(f"sqlite:///{db}")
    try:
        ts = PolicyConfig(kind=PolicyKind.THOMPSON)
        loose = replay(store, "r", ts, threshold=0.9, chunk=50)
        strict = replay(store, "r", ts, threshold=0.9999, chunk=50)
    finally:
        store.close()
    assert loose.promoted_at is not None
    assert strict.promoted_at is None or strict.promoted_at >= loose.promoted_at
    assert math.isclose(sum(loose.final_p_best), 1.0)


def test_cli_replay_reads_a_live_sqlite_file(db: Path, capsys: object) -> None:
    assert cli_main(["replay", "r", "--database-url", f"sqlite:///{db}", "--policy", "ucb1"]) == 0
    out = json.loads(capsys.readouterr().out)  # type: ignore[attr-defined]
    assert out["experiment"] == "r" and out["decisions"] == 12_000
