"""Shared pytest configuration: plugins that provide the session fixtures."""

import signal

pytest_plugins = [
    "tests.fixtures.kube",
    "tests.fixtures.servers",
]


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure() -> None:
    # The control plane and the private servers run in sessions of their own, so a SIGTERM to
    # pytest (a cancelled CI job) would leave them running: let it unwind through fixture teardown.
    signal.signal(signal.SIGTERM, _interrupt)
