"""Typed Python client for the bandit traffic allocator (gRPC service allocator.v1).

>>> from allocator_client import AllocatorClient, pb
>>> client = AllocatorClient("localhost:50051")

Exports are loaded lazily so that ``python -m allocator_client.codegen`` still runs when the
generated stubs in ``allocator_client.v1`` are missing or stale.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from allocator_client.client import (
        DEFAULT_RETRY,
        NO_RETRY,
        AllocatorClient,
        BatchAssignment,
        RetryPolicy,
        RetryThrottle,
        RewardBatcher,
        batch_decision_id,
        reward_batch_request,
    )
    from allocator_client.v1 import allocator_pb2 as pb
    from allocator_client.v1 import allocator_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_RETRY",
    "NO_RETRY",
    "AllocatorClient",
    "BatchAssignment",
    "RetryPolicy",
    "RetryThrottle",
    "RewardBatcher",
    "batch_decision_id",
    "pb",
    "pb_grpc",
    "reward_batch_request",
]

_MODULES = {
    "pb": "allocator_client.v1.allocator_pb2",
    "pb_grpc": "allocator_client.v1.allocator_pb2_grpc",
}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    if name in __all__:
        return getattr(importlib.import_module("allocator_client.client"), name)
    raise AttributeError(f"module 'allocator_client' has no attribute {name!r}")
