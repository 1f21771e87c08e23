"""Kubernetes mode's resource source: list+watch of the API server into the control plane's store."""
