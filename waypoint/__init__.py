"""waypoint: the per-service L7 proxy (routing, retries, timeouts, faults, mirroring, L7 authz)."""
