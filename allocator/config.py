"""Server configuration: one frozen record, built from flags with environment fallbacks.

Every flag ``--some-thing`` has the environment variable ``ALLOCATOR_SOME_THING``; a flag
given on the command line wins over the environment, which wins over the default.

>>> cfg = ServerConfig.from_args(["--listen", "127.0.0.1:0"], env={})
>>> cfg.listen, cfg.http_port
('127.0.0.1:0', 9464)
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ServerConfig:
    """Everything `allocator serve` can be told."""

    listen: str = "127.0.0.1:50051"
    http_port: int = 9464
    http_host: str = "127.0.0.1"
    database_url: str = "sqlite:///allocator.sqlite"
    admin_token: str = ""
    token_secret: str = ""
    attribution_window_s: int = 86_400
    default_grace_s: float = 35.0
    replica_id: str = ""
    sync_interval_s: float = 0.5
    snapshot_interval_s: float = 5.0
    promotion_interval_s: float = 1.0
    flush_max_rows: int = 20_000
    flush_max_delay_ms: float = 2.0
    max_queue: int = 200_000
    max_workers: int = 16
    max_experiments: int = 10_000
    metrics_max_experiments: int = 100
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    grace_s: float = 10.0
    shutdown_delay_s: float = 0.0
    log_level: str = "INFO"
    log_json: bool = True

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"listen must be HOST:PORT, got {self.listen!r}")
        if not -1 <= self.http_port < 65536:
            raise ValueError(
                f"http_port must be 0-65535 (0: any free port, -1: off), got {self.http_port}"
            )
        if self.attribution_window_s < 1:
            raise ValueError("attribution_window_s must be >= 1")
        if self.sync_interval_s <= 0 or self.snapshot_interval_s <= 0:
            raise ValueError("sync_interval_s and snapshot_interval_s must be > 0")
        if self.flush_max_rows < 1 or self.max_queue < self.flush_max_rows:
            raise ValueError("need 1 <= flush_max_rows <= max_queue")
        bad = next((i for i, ch in enumerate(self.admin_token) if not "!" <= ch <= "~"), None)
        if bad is not None:
            # Sent as the gRPC metadata value "Bearer <token>", which clients only send as
            # printable ASCII (grpcio refuses anything else; whitespace may be trimmed): such
            # a token could never be presented. Its position only: the token is a secret.
            raise ValueError(
                f"admin_token must be printable ASCII without spaces (it travels in gRPC "
                f"metadata): character {bad + 1} is not"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("grace_s", "shutdown_delay_s", "default_grace_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(
                f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level}"
            )

    @property
    def effective_replica_id(self) -> str:
        """The replica id, or host:pid when none was configured."""
        return self.replica_id or f"{socket.gethostname()}:{os.getpid()}"

    @property
    def exposed_plaintext_admin(self) -> bool:
        """An admin token that would cross the network in clear: set, no TLS, and a listen
        address that is not loopback (``0.0.0.0``, ``[::]``, a host name or address)."""
        if not self.admin_token or self.tls_cert:
            return False
        host = self.listen.rpartition(":")[0].strip("[]").lower().rstrip(".")
        if host == "localhost" or host.endswith(".localhost"):  # loopback by RFC 6761
            return False
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:  # a host name: may resolve to anything
            return True
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            return not addr.ipv4_mapped.is_loopback  # ::ffff:127.0.0.1
        return not addr.is_loopback

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        """The argparse parser of `allocator serve`."""
        p = argparse.ArgumentParser(prog="allocator serve", description="Run the allocator.")
        help_text = {
            "listen": "gRPC address HOST:PORT (port 0 picks a free one)",
            "http_port": "port of the HTTP endpoint serving /metrics and /healthz "
            "(0: any free port, -1: off)",
            "http_host": "address the HTTP endpoint binds",
            "database_url": "SQLAlchemy URL: sqlite:///file.sqlite or postgresql+psycopg://...",
            "admin_token": "bearer token required by Promote/Rollback/Pause/Resume "
            "(empty: admin RPCs refused)",
            "token_secret": "HMAC secret for decision ids (empty: generated once, kept in the DB)",
            "attribution_window_s": "rewards for decisions older than this are expired",
            "default_grace_s": "least seconds past a decision's window before its default "
            "reward is written (a real reward checked in time may take 30 s to commit, plus "
            "clock skew between replicas); 10%% of longer windows, up to 60 s",
            "replica_id": "name of this replica in the reward log (default host:pid)",
            "sync_interval_s": "how often to pull other replicas' rewards (PostgreSQL)",
            "snapshot_interval_s": "how often to snapshot posteriors to the store",
            "promotion_interval_s": "how often the leader evaluates promotion and monitors",
            "flush_max_rows": "most rewards written in one group commit",
            "flush_max_delay_ms": "longest a reward waits for its group commit to start",
            "max_queue": "rewards queued before Reward answers RESOURCE_EXHAUSTED",
            "max_workers": "threads for RPC handlers that may block (Assign runs on the loop)",
            "max_experiments": "most experiments (live and archived) the server will hold",
            "metrics_max_experiments": "experiments with their own metric labels; rest summed",
            "tls_cert": "PEM certificate chain: serve gRPC over TLS",
            "tls_key": "PEM private key for --tls-cert",
            "tls_client_ca": "PEM CA bundle: require and verify client certificates (mTLS)",
            "grace_s": "seconds in-flight RPCs get to finish on SIGTERM",
            "shutdown_delay_s": "seconds between reporting NOT_SERVING and refusing new calls "
            "on SIGTERM (time for load balancers' health checks to notice)",
            "log_level": "DEBUG, INFO, WARNING or ERROR",
            "log_json": "structured JSON logs (true/false)",
        }
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = _TYPES[str(f.type)]
            if kind is bool:
                p.add_argument(flag, type=_parse_bool, default=None, help=help_text[f.name])
            else:
                p.add_argument(flag, type=kind, default=None, help=help_text[f.name])
        return p

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
    ) -> ServerConfig:
        """Flags, then ``ALLOCATOR_*`` environment variables, then defaults."""
        env = os.environ if env is None else env
        ns = cls.parser().parse_args(argv)
        values: dict[str, Any] = {}
        for f in fields(cls):
            given = getattr(ns, f.name)
            if given is not None:
                values[f.name] = given
                continue
            raw = env.get("ALLOCATOR_" + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = _TYPES[str(f.type)]
            try:
                values[f.name] = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError:
                raise ValueError(f"ALLOCATOR_{f.name.upper()}: cannot parse {raw!r}") from None
        return cls(**values)


# Field annotations are strings under `from __future__ import annotations`.
_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool}


def _parse_bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {raw!r}")
