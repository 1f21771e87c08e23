"""What every proxy (ztunnel, waypoint) starts with: bootstrap credentials, TLS contexts per identity, the connection log."""
