"""`zstack-cli`: a client of the management nodes' REST API."""
