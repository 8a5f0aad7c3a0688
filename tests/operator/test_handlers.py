"""kopf-facing behaviour that needs no cluster: the retry back-off."""

from zstack_operator.handlers import MAX_RETRY_DELAY, retry_delay


def test_a_failing_reconcile_backs_off_exponentially_up_to_five_minutes() -> None:
    assert [retry_delay(n) for n in range(4)] == [5, 10, 20, 40]
    assert retry_delay(10) == retry_delay(10_000) == MAX_RETRY_DELAY == 300
