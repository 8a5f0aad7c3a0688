"""The product's schema steps, in the order they were introduced: append, never reorder (db.migrate)."""

from __future__ import annotations

from zstack_node.cloud.schema import v2_cloud, v4_api_scale
from zstack_node.db import Migration
from zstack_node.membership.table import v1_membership, v3_heartbeat_continuity

MIGRATIONS: list[Migration] = [v1_membership, v2_cloud, v3_heartbeat_continuity, v4_api_scale]
