"""ztunnel: the node-level L4 proxy (capture, HBONE mTLS, L4 authorization, TCP metrics)."""
