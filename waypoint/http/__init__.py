"""The waypoint's HTTP/1.1 protocol core (sans-IO, llhttp via httptools); see codec.py."""
from .codec import ClientConnection, SendState, ServerConnection
from .errors import HttpError, LocalProtocolError
from .events import (Body, ConnectionClosed, EndOfMessage, Event, Headers, InformationalResponse, RequestHead,
                     ResponseHead)
from .framing import HOP_BY_HOP, Limits

__all__ = ["ServerConnection", "ClientConnection", "SendState", "HttpError", "LocalProtocolError", "Body",
           "ConnectionClosed", "EndOfMessage", "Event", "Headers", "InformationalResponse", "RequestHead",
           "ResponseHead", "HOP_BY_HOP", "Limits"]
