"""Private RabbitMQ, PostgreSQL and Prometheus servers for tests and local development.

Each server runs from the Debian packages in a directory of its own, on free loopback ports, with
random credentials, and is stopped by pid (never by name)::

    from zstack_devcluster.services import PostgreSQL, RabbitMQ

    with RabbitMQ(tmp / "mq") as mq, PostgreSQL(tmp / "pg") as pg:
        use(mq.url, pg.url)
        mq.restart()            # same port, same data
        with pg.stopped():      # the database is down inside the block
            ...
"""

from zstack_devcluster.ports import free_port, free_ports, port_is_free
from zstack_devcluster.services.base import Service, ServiceError
from zstack_devcluster.services.postgres import PostgreSQL
from zstack_devcluster.services.prometheus import Prometheus, QueryError
from zstack_devcluster.services.rabbitmq import RabbitMQ

__all__ = ["PostgreSQL", "Prometheus", "QueryError", "RabbitMQ", "Service", "ServiceError", "free_port", "free_ports",
           "port_is_free"]
