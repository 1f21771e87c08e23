"""Kernel plumbing for the mesh: network namespaces, cgroup v2 and (later) the eBPF capture programs."""
