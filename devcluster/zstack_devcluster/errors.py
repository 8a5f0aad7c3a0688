"""The one exception type the CLI turns into a clean error message."""


class DevclusterError(RuntimeError):
    """A failure with a message that says what to do next."""
