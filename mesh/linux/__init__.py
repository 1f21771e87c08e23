"""Linux plumbing shared by the node proxy and the local runtime: network namespaces and cgroups v2."""
