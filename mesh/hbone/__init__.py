"""HBONE: HTTP/2 CONNECT tunnels over mutual TLS 1.3 (port 15008) -- pooled client and server, streams and splices."""
from .api import ConnectRequest, PoolKey, Reject, Rejection, TunnelError, TunnelResult
from .connection import ConnectionConfig
from .frames import ErrorCode, ProtocolError
from .pool import HbonePool
from .server import HboneServer, PendingStream
from .stream import HboneStream
from .tunnel import HoldingProtocol, splice

__all__ = [
    "HbonePool", "PoolKey", "HboneServer", "PendingStream", "HboneStream", "splice", "ConnectRequest", "Reject",
    "Rejection", "TunnelResult", "TunnelError", "ConnectionConfig", "ProtocolError", "ErrorCode", "HoldingProtocol",
]
