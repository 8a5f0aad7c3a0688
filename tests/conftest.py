"""Shared pytest configuration: plugins that provide the session fixtures, and seeded randomness."""

import os
import random
import secrets
import signal

import pytest

pytest_plugins = [
    "tests.fixtures.kube",  # before containernode, which imports it (so pytest rewrites its asserts)
    "tests.fixtures.containernode",
    "tests.fixtures.servers",
]

SEED_HELP = "seed of every test's randomness (default: $ZSTACK_TEST_SEED, else a new one, printed on failure)"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--seed", type=int, default=None, help=SEED_HELP)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # The control plane and the private servers run in sessions of their own, so a SIGTERM to
    # pytest (a cancelled CI job) would leave them running: let it unwind through fixture teardown.
    signal.signal(signal.SIGTERM, _interrupt)
    chosen = config.getoption("--seed")
    if chosen is None:
        chosen = int(os.environ.get("ZSTACK_TEST_SEED") or secrets.randbits(32))
    config.stash[_SEED] = chosen


_SEED = pytest.StashKey[int]()


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    """The run's seed; the global `random` is seeded from it and the test's id, so each test repeats alone."""
    value = request.config.stash[_SEED]
    random.seed(f"{value}:{request.node.nodeid}")
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        value = item.config.stash[_SEED]
        report.sections.append(("seed", f"random seed {value}: repeat with --seed {value} or ZSTACK_TEST_SEED={value}"))
