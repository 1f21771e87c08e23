"""Local mode's runtime, standing in for kube-apiserver + scheduler + CNI + kubelet on one host:
resource store wiring, address planning, simulated node/pod networks, processes, the CLI."""
