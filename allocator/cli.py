"""`allocator serve | create | list | report | promote | rollback | pause | resume | watch`.

Everything but ``serve`` talks to a running server through the Python client:
``--target`` (or ``ALLOCATOR_TARGET``, default 127.0.0.1:50051) and ``--admin-token`` (or
``ALLOCATOR_ADMIN_TOKEN``) for the admin commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from allocator_client import DEFAULT_RETRY, AllocatorClient, RetryPolicy
from allocator_client.v1 import allocator_pb2 as pb
from google.protobuf import json_format


def _client(ns: argparse.Namespace, retries: RetryPolicy = DEFAULT_RETRY) -> AllocatorClient:
    return AllocatorClient(
        ns.target, admin_token=ns.admin_token or None, timeout=ns.timeout, retries=retries
    )


def _print(msg: object) -> None:
    print(json_format.MessageToJson(msg, indent=2, sort_keys=True))  # type: ignore[arg-type]


def _create(ns: argparse.Namespace) -> int:
    spec = pb.ExperimentSpec(name=ns.name, variants=ns.variants)
    if ns.spec:
        json_format.Parse(ns.spec, spec)
        spec.name = ns.name
        if ns.variants:
            del spec.variants[:]
            spec.variants.extend(ns.variants)
    with _client(ns) as c:
        _print(c.create_experiment(spec))
    return 0


def _list(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        for exp in c.list_experiments():
            state = pb.ExperimentState.Name(exp.state).removeprefix("EXPERIMENT_STATE_")
            print(f"{exp.spec.name}\t{state}\t{','.join(exp.spec.variants)}\t{exp.champion}")
    return 0


def _report(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        rep = c.get_report(ns.name)
    if ns.json:
        _print(rep)
        return 0
    print(f"{ns.name}: {pb.ExperimentState.Name(rep.experiment.state)}")
    level = f"{100 * rep.interval_level:.4g}% CI"  # 1 - the spec's alpha
    print(
        f"{'variant':<16}{'assigned':>10}{'rewards':>10}{'mean':>9}{level:>18}"
        f"{'P(best)':>9}{'E[loss]':>10}{'strat.':>9}"
    )
    for v in rep.variants:
        print(
            f"{v.name:<16}{v.assignments:>10}{v.rewards:>10}{v.mean:>9.4f}"
            f"{f'[{v.ci_low:.4f}, {v.ci_high:.4f}]':>18}{v.p_best:>9.3f}"
            f"{v.expected_loss:>10.5f}{v.stratified_mean:>9.4f}"
        )
    for v in rep.variants[1:]:
        print(
            f"{v.name} - control: lift {v.lift:+.4f} [{v.lift_ci_low:.4f}, "
            f"{v.lift_ci_high:.4f}], stratified by epoch {v.stratified_lift:+.4f} "
            f"[{v.stratified_lift_ci_low:.4f}, {v.stratified_lift_ci_high:.4f}]"
        )
    for t in rep.tests:
        # Drift tests compare a variant's prediction scores since its promotion with those
        # before it, not with control.
        what = "scores now vs before" if t.name.endswith("_drift") else "vs control"
        print(
            f"{t.name} {t.variant} {what}: statistic {t.statistic:.3f}, "
            f"p {t.p_value:.4g} (Holm-adjusted {t.p_value_adjusted:.4g})"
        )
    if rep.tests:
        print(
            "  (fixed-horizon tests, not a decision rule under repeated looks; the pooled "
            "ones are descriptive under adaptive allocation, stratified_z compares within "
            "epochs; see the report's notes)"
        )
    if rep.srm.decisions:
        flag = "  MISMATCH" if rep.srm.flagged else ""
        print(
            f"SRM: sequential p = {rep.srm.sequential_p_value:.4g} (one-look chi-square p = "
            f"{rep.srm.p_value:.4g}) over {rep.srm.decisions} table decisions{flag}"
        )
    else:
        print("SRM: not checked (no decision drawn from the allocation table)")
    if rep.promotion.decision:
        print(
            f"promotion: {rep.promotion.decision} {rep.promotion.candidate} "
            f"({'; '.join(rep.promotion.reasons)})"
        )
    return 0


def _admin(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        if ns.command == "promote":
            _print(c.promote(ns.name, ns.variant, reason=ns.reason))
        elif ns.command == "rollback":
            _print(c.rollback(ns.name, ns.variant or "", reason=ns.reason))
        elif ns.command == "pause":
            _print(c.pause(ns.name, reason=ns.reason))
        else:
            _print(c.resume(ns.name, reason=ns.reason))
    return 0


# `allocator watch` outlives a server restart: 30 reconnects in a row, backoff capped at 2 s
# (about half a minute with full jitter), before it gives up and exits 1.
_WATCH_RETRY = RetryPolicy(max_attempts=30, initial_backoff=0.1, max_backoff=2.0)


def _watch(ns: argparse.Namespace) -> int:
    with _client(ns, _WATCH_RETRY) as c:
        try:
            events = c.watch_events(ns.name or "", after_sequence=ns.after, resume=True)
            for event in events:
                print(json.dumps(json_format.MessageToDict(event)), flush=True)
        except KeyboardInterrupt:
            return 0
    return 0


def _replay(ns: argparse.Namespace) -> int:
    import shutil
    import sqlite3
    import tempfile

    from allocator.policies import PolicyConfig
    from allocator.replay import replay
    from allocator.store import SqlStore

    url = ns.database_url
    with tempfile.TemporaryDirectory() as tmp:
        if url.startswith("sqlite:///"):
            # A running server holds the SQLite file: replay reads a consistent copy made
            # with SQLite's online backup API instead.
            copy = f"{tmp}/replay.sqlite"
            src = sqlite3.connect(url.removeprefix("sqlite:///"))
            dst = sqlite3.connect(copy)
            src.backup(dst)
            src.close()
            dst.close()
            url = f"sqlite:///{copy}"
        store = SqlStore.open(url)
        try:
            candidate = PolicyConfig(kind=ns.policy, reward=ns.reward, epsilon=ns.epsilon)
            result = replay(store, ns.name, candidate, threshold=ns.threshold, seed=ns.seed)
        finally:
            store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result.__dict__, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `allocator` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from allocator.config import ServerConfig
        from allocator.server import serve
        from allocator.store import ReplicaConflict, SchemaTooNew, StoreLocked, StoreUnavailable

        try:
            config = ServerConfig.from_args(argv[1:])
        except ValueError as err:
            print(f"allocator serve: {err}", file=sys.stderr)
            return 2
        try:
            return serve(config)
        except (StoreLocked, SchemaTooNew, StoreUnavailable, ReplicaConflict, OSError) as err:
            # Start-up failures an operator can act on: say what, not a traceback.
            print(f"allocator serve: {err}", file=sys.stderr)
            return 1
    p = argparse.ArgumentParser(prog="allocator", description=__doc__.split("\n")[0])
    p.add_argument("--target", default=os.environ.get("ALLOCATOR_TARGET", "127.0.0.1:50051"))
    p.add_argument("--admin-token", default=os.environ.get("ALLOCATOR_ADMIN_TOKEN", ""))
    p.add_argument("--timeout", type=float, default=5.0)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the server (see `allocator serve --help`)")
    c = sub.add_parser("create", help="create an experiment")
    c.add_argument("name")
    c.add_argument("variants", nargs="*")
    c.add_argument("--spec", help="ExperimentSpec as JSON (proto JSON names)")
    c.set_defaults(fn=_create)
    sub.add_parser("list", help="list experiments").set_defaults(fn=_list)
    r = sub.add_parser("report", help="Bayesian + frequentist report")
    r.add_argument("name")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=_report)
    for cmd in ("promote", "rollback", "pause", "resume"):
        a = sub.add_parser(cmd, help=f"admin: {cmd} (needs --admin-token)")
        a.add_argument("name")
        if cmd in ("promote", "rollback"):
            a.add_argument("variant", nargs="?" if cmd == "rollback" else None, default="")
        a.add_argument("--reason", default=f"{cmd} from the CLI")
        a.set_defaults(fn=_admin)
    rp = sub.add_parser("replay", help="off-policy evaluation of a policy/threshold on the log")
    rp.add_argument("name")
    rp.add_argument(
        "--database-url",
        default=os.environ.get("ALLOCATOR_DATABASE_URL", "sqlite:///allocator.sqlite"),
    )
    rp.add_argument(
        "--policy", default="thompson", help="thompson, ucb1, kl_ucb, epsilon_greedy, ..."
    )
    rp.add_argument("--reward", default="bernoulli", help="bernoulli or normal")
    rp.add_argument("--epsilon", type=float, default=0.1)
    rp.add_argument("--threshold", type=float, default=0.95, help="P(best) promotion threshold")
    rp.add_argument("--seed", type=int, default=1)
    rp.set_defaults(fn=_replay)
    w = sub.add_parser("watch", help="stream events")
    w.add_argument("name", nargs="?", default="")
    w.add_argument("--after", type=int, default=0, help="replay events after this sequence")
    w.set_defaults(fn=_watch)
    ns = p.parse_args(argv)
    try:
        return int(ns.fn(ns))
    except Exception as err:
        code = getattr(err, "code", None)
        details = getattr(err, "details", None)
        if callable(code) and callable(details):
            print(f"allocator {ns.command}: {code().name}: {details()}", file=sys.stderr)
        else:
            print(f"allocator {ns.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
