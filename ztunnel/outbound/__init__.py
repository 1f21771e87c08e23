"""Outbound: traffic a pod sends, captured on 15001 and carried to its destination."""
