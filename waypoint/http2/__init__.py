"""The waypoint's HTTP/2 (prior knowledge, so gRPC): sans-IO connections over h2 and the per-stream pipeline adapters."""
from .connection import PREFACE, ClientConnection, ServerConnection
from .connection import Settings as H2Settings
from .downstream import H2Downstream, ServerStream

__all__ = ["PREFACE", "ClientConnection", "ServerConnection", "H2Settings", "H2Downstream", "ServerStream"]
