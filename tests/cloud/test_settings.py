"""Cloud tuning from the environment: defaults, overrides, and bad values refused by name."""

from __future__ import annotations

import pytest

from zstack_node.cloud.settings import CloudSettings
from zstack_node.config import ConfigError


def test_defaults_when_nothing_is_set():
    assert CloudSettings.from_env({}) == CloudSettings()


def test_variables_override_their_fields():
    tuning = CloudSettings.from_env({"ZSTACK_HOST_PING_INTERVAL": "0.25", "ZSTACK_HOST_PING_FAILURES": "5",
                                     "ZSTACK_SIM_LATENCY": "0"})
    assert (tuning.host_ping_interval, tuning.host_ping_failures, tuning.sim_latency) == (0.25, 5, 0.0)


@pytest.mark.parametrize(("var", "value", "says"), [
    ("ZSTACK_HOST_PING_FAILURES", "three", "not a whole number"),
    ("ZSTACK_HOST_PING_FAILURES", "0", "at least 1"),
    ("ZSTACK_JOB_SWEEP_INTERVAL", "-1", "positive"),
    ("ZSTACK_SIM_FAILURE_RATE", "1.5", "probability"),
    ("ZSTACK_SIM_LATENCY", "fast", "not a number"),
])
def test_a_bad_value_is_refused_naming_its_variable(var, value, says):
    with pytest.raises(ConfigError, match=var) as refused:
        CloudSettings.from_env({var: value})
    assert says in str(refused.value)
