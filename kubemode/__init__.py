"""Kubernetes mode's install side: the manifests `ambient install` prints (CRDs, RBAC, workloads)."""
