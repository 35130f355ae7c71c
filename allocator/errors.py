"""Domain errors: each subclasses a built-in and carries the data a status message needs.

The servicer maps them to gRPC status codes by type, in one place (``service.py``).
"""

from __future__ import annotations


class UnknownExperiment(KeyError):
    """No experiment of that name (NOT_FOUND)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"experiment {self.name!r} does not exist"


class ExperimentExists(KeyError):
    """The name is taken (ALREADY_EXISTS)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"experiment {self.name!r} already exists"


class InvalidArgument(ValueError):
    """A request field is wrong (INVALID_ARGUMENT); ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class WrongState(RuntimeError):
    """The experiment's state forbids the action (FAILED_PRECONDITION)."""

    def __init__(self, experiment: str, state: str, action: str) -> None:
        super().__init__(f"experiment {experiment!r} is {state}: cannot {action}")
        self.experiment = experiment
        self.state = state
        self.action = action


class Overloaded(RuntimeError):
    """Too much queued work (RESOURCE_EXHAUSTED)."""


class Busy(RuntimeError):
    """Another thread holds the experiment and the caller asked not to wait (internal: the
    server retries the call where it may wait; never sent to a client)."""


class ShuttingDown(RuntimeError):
    """The server is stopping; try again, here or on another replica (UNAVAILABLE)."""


class NotLoadedYet(RuntimeError):
    """A signed decision id names an experiment or variant another replica created and
    this one has not loaded yet (UNAVAILABLE: retry, it is loaded within a sync interval)."""


class Unauthenticated(PermissionError):
    """No admin credentials were sent (UNAUTHENTICATED)."""


class PermissionDenied(PermissionError):
    """Admin credentials were sent but are wrong (PERMISSION_DENIED)."""
