"""HBONE: HTTP/2 CONNECT tunnels over mutual TLS 1.3 (port 15008) -- pooled client and server for ztunnel."""
from .api import ConnectRequest, PoolKey, Reject, Rejection, TunnelError, TunnelResult
from .connection import ConnectionConfig
from .frames import ErrorCode, ProtocolError
from .pool import HbonePool
from .server import HboneServer
from .tunnel import HoldingProtocol

__all__ = [
    "HbonePool", "PoolKey", "HboneServer", "ConnectRequest", "Reject", "Rejection", "TunnelResult", "TunnelError",
    "ConnectionConfig", "ProtocolError", "ErrorCode", "HoldingProtocol",
]
