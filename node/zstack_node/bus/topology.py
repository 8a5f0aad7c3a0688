"""Names of the RabbitMQ objects of the cloud bus (docs/ARCHITECTURE.md), and their declaration.

- `zstack.message.p2p` (direct) carries every point-to-point message; the routing key is the target
  queue's name. Its alternate exchange catches a message whose queue no longer exists (its MN died)
  into the durable `zstack.message.unroutable` queue, which serving MNs consume and re-route.
- Per MN and service: `zstack.message.<service>.<mnUuid>`, exclusive, so it dies with its MN.
- Per MN: the reply queue `zstack.message.cloudbus.<mnUuid>` and an event queue on `zstack.event`.
- `zstack.message.api.portal`: durable, shared by all MNs as competing consumers.
- `zstack.message.deadletter`: malformed and undeliverable messages, with the reason in a header.

One broker vhost serves one cluster: these names are not prefixed by the cluster name.
"""

from __future__ import annotations

from zstack_node.bus.amqp import Channel

P2P_EXCHANGE = "zstack.message.p2p"
UNROUTABLE_EXCHANGE = "zstack.message.unroutable"
UNROUTABLE_QUEUE = "zstack.message.unroutable"
EVENT_EXCHANGE = "zstack.event"
DEAD_LETTER_EXCHANGE = "zstack.message.deadletter"
DEAD_LETTER_QUEUE = "zstack.message.deadletter"
API_QUEUE = "zstack.message.api.portal"
API_SERVICE = "api.portal"
REPLY_SERVICE = "cloudbus"
_PREFIX = "zstack.message."


def service_queue(service: str, mn_uuid: str) -> str:
    return f"{_PREFIX}{service}.{mn_uuid}"


def reply_queue(mn_uuid: str) -> str:
    return service_queue(REPLY_SERVICE, mn_uuid)


def event_queue(mn_uuid: str) -> str:
    return f"zstack.event.{mn_uuid}"


def split_queue(name: str) -> tuple[str, str] | None:
    """`zstack.message.<service>.<mn>` -> (service, mn); None for any other name."""
    if not name.startswith(_PREFIX):
        return None
    service, _, mn = name[len(_PREFIX):].rpartition(".")
    return (service, mn) if service and len(mn) == 32 else None


async def declare_shared(ch: Channel) -> None:
    """The exchanges and durable queues every MN shares. Declaring them again is a no-op."""
    await ch.exchange(UNROUTABLE_EXCHANGE, "fanout")
    await ch.exchange(DEAD_LETTER_EXCHANGE, "fanout")
    await ch.exchange(P2P_EXCHANGE, "direct", arguments={"alternate-exchange": UNROUTABLE_EXCHANGE})
    await ch.exchange(EVENT_EXCHANGE, "topic")
    await ch.queue(UNROUTABLE_QUEUE, durable=True)
    await ch.bind(UNROUTABLE_QUEUE, UNROUTABLE_EXCHANGE, "")
    await ch.queue(DEAD_LETTER_QUEUE, durable=True)
    await ch.bind(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, "")
    await ch.queue(API_QUEUE, durable=True)
    await ch.bind(API_QUEUE, P2P_EXCHANGE, API_QUEUE)


def topic_matches(pattern: str, topic: str) -> bool:
    """AMQP topic matching: `*` is one word, `#` is zero or more."""
    return _match(pattern.split("."), topic.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _match(rest, words[1:])
