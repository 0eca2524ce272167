"""The cluster: membership (who the nodes are), the ring's upstream (where each environment's
changes come from) and the peer links between nodes."""
