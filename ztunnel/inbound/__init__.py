"""Inbound: traffic to a pod, arriving over HBONE (15008) or in plaintext (15006)."""
