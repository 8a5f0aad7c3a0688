"""`python -m zstack_node` runs one management node, like the `zstack-node` script."""

from .cli import main

main()
