"""Shared pytest settings. Root tests (netns, cgroups, eBPF) are never skipped: this project
runs as root everywhere, CI included, so a missing privilege is a failure, not a skip."""
