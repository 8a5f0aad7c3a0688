"""`python -m zstack_node` runs one management node, like the `zstack-node` script."""

from zstack_node.cli import main

main()
