"""Kernel plumbing for the mesh: network namespaces, cgroup v2 and the eBPF traffic capture."""
