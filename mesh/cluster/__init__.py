"""The local cluster's host plumbing: address planning, simulated node/pod networks, processes."""
