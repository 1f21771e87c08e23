"""In-process ztunnel tests: real pod proxies on loopback addresses, no root."""
