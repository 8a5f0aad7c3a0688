"""Private RabbitMQ, PostgreSQL and Prometheus servers for tests and local development.

Each server runs from the Debian packages in a directory of its own, on free loopback ports, with
random credentials, and is stopped by pid (never by name)::

    from devcluster.services import PostgreSQL, RabbitMQ

    with RabbitMQ(tmp / "mq") as mq, PostgreSQL(tmp / "pg") as pg:
        use(mq.url, pg.url)
        mq.restart()            # same port, same data
        with pg.stopped():      # the database is down inside the block
            ...
"""

from devcluster.ports import free_port, free_ports, port_is_free
from devcluster.services.base import Service, ServiceError
from devcluster.services.postgres import PostgreSQL
from devcluster.services.prometheus import Prometheus, QueryError
from devcluster.services.rabbitmq import RabbitMQ

__all__ = ["PostgreSQL", "Prometheus", "QueryError", "RabbitMQ", "Service", "ServiceError", "free_port", "free_ports",
           "port_is_free"]
