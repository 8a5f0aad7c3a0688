"""Shared pytest configuration: plugins that provide the session fixtures."""

pytest_plugins = [
    "tests.fixtures.kube",
    "tests.fixtures.servers",
]
