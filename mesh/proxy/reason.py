"""The closed set of data-path reasons (why a connection failed or was refused), and the one classifier.

Every stable label the proxies log or count is a `Reason`; each member carries its metric label
(the access log's `error`), a coarse `Kind` (linkerd's ErrorKind), the Istio/Envoy response flag
and the HBONE status it answers with where one applies. `classify()` turns whatever a data path
caught -- an exception, an HBONE reason string, a relay error -- into exactly one Reason, walking
an exception's causes; anything it does not know is `Reason.UNEXPECTED`, never a new label.

Flags are written from the reporting proxy's point of view on the *inbound* side; for members
marked `mirrored` (the peer broke the protocol, or one side of the relay ended it) an outbound
report swaps Downstream and Upstream (`flag_for`).
"""
from __future__ import annotations

import asyncio
import enum
import ssl

__all__ = ["Kind", "Reason", "classify", "Direction"]


class Direction(enum.Enum):
    """Which way a connection goes, seen from the pod the proxy serves."""

    OUTBOUND = "outbound"
    INBOUND = "inbound"


class Kind(enum.Enum):
    """Coarse classes of reasons, for code that must decide on the class (retry, count, log level)."""

    POLICY = "policy"               # authorization said no
    BAD_REQUEST = "bad_request"     # the peer asked for something it must not (400)
    PROTOCOL = "protocol"           # the peer broke HTTP/2 or HBONE
    TLS = "tls"                     # handshake or peer identity
    LIMIT = "limit"                 # a local bound was hit (pending handshakes, streams)
    TIMEOUT = "timeout"             # the peer took too long
    NO_ROUTE = "no_route"           # no way to reach the destination
    UPSTREAM = "upstream"           # the destination could not be reached
    CLOSED = "closed"               # an established connection ended abnormally
    INTERNAL = "internal"           # our own failure


class Reason(enum.Enum):
    """A data-path reason: value = (label, kind, flag, hbone status or None, mirrored)."""

    # -- authorization (401) --
    DENIED_BY_POLICY = ("denied_by_policy", Kind.POLICY, "DENY", 401, False)
    NO_ALLOW_MATCH = ("no_allow_match", Kind.POLICY, "DENY", 401, False)
    MTLS_REQUIRED = ("mtls_required", Kind.POLICY, "DENY", 401, False)
    CONNECT_DENIED = ("connect_denied", Kind.POLICY, "DENY", 401, False)
    """Outbound: the destination's proxy answered the CONNECT with 401."""

    # -- CONNECT requests this proxy refuses (400) --
    AUTHORITY_WITHOUT_PORT = ("authority_without_port", Kind.BAD_REQUEST, "DPE", 400, False)
    AUTHORITY_NOT_IP = ("authority_not_ip", Kind.BAD_REQUEST, "DPE", 400, False)
    AUTHORITY_BAD_PORT = ("authority_bad_port", Kind.BAD_REQUEST, "DPE", 400, False)
    AUTHORITY_NOT_LOCAL = ("authority_not_local", Kind.BAD_REQUEST, "DPE", 400, False)
    ZTUNNEL_PORT = ("ztunnel_port", Kind.BAD_REQUEST, "DPE", 400, False)
    # ...and the ones the HTTP/2 layer refuses before any handler (mesh/hbone/connect_rules.py)
    NOT_CONNECT = ("not_connect", Kind.BAD_REQUEST, "DPE", 400, False)
    MISSING_METHOD = ("missing_method", Kind.BAD_REQUEST, "DPE", 400, False)
    MISSING_AUTHORITY = ("missing_authority", Kind.BAD_REQUEST, "DPE", 400, False)
    BAD_AUTHORITY = ("bad_authority", Kind.BAD_REQUEST, "DPE", 400, False)
    SCHEME_OR_PATH_PRESENT = ("scheme_or_path_present", Kind.BAD_REQUEST, "DPE", 400, False)
    DUPLICATE_PSEUDO_HEADER = ("duplicate_pseudo_header", Kind.BAD_REQUEST, "DPE", 400, False)
    UNKNOWN_PSEUDO_HEADER = ("unknown_pseudo_header", Kind.BAD_REQUEST, "DPE", 400, False)
    PSEUDO_HEADER_AFTER_REGULAR = ("pseudo_header_after_regular", Kind.BAD_REQUEST, "DPE", 400, False)
    INVALID_HEADER_NAME = ("invalid_header_name", Kind.BAD_REQUEST, "DPE", 400, False)
    INVALID_HEADER_VALUE = ("invalid_header_value", Kind.BAD_REQUEST, "DPE", 400, False)
    CONNECTION_SPECIFIC_HEADER = ("connection_specific_header", Kind.BAD_REQUEST, "DPE", 400, False)

    # -- HTTP/2 protocol errors (connection or stream; mesh/hbone/frames.py, connection.py) --
    BAD_PREFACE = ("bad_preface", Kind.PROTOCOL, "DPE", None, True)
    SETTINGS_EXPECTED = ("settings_expected", Kind.PROTOCOL, "DPE", None, True)
    FRAME_TOO_LARGE = ("frame_too_large", Kind.PROTOCOL, "DPE", None, True)
    BAD_FRAME_SIZE = ("bad_frame_size", Kind.PROTOCOL, "DPE", None, True)
    BAD_PADDING = ("bad_padding", Kind.PROTOCOL, "DPE", None, True)
    FRAME_ON_STREAM = ("frame_on_stream", Kind.PROTOCOL, "DPE", None, True)
    FRAME_ON_STREAM_ZERO = ("frame_on_stream_zero", Kind.PROTOCOL, "DPE", None, True)
    EXPECTED_CONTINUATION = ("expected_continuation", Kind.PROTOCOL, "DPE", None, True)
    UNEXPECTED_CONTINUATION = ("unexpected_continuation", Kind.PROTOCOL, "DPE", None, True)
    TOO_MANY_CONTINUATIONS = ("too_many_continuations", Kind.PROTOCOL, "DPE", None, True)
    HEADER_LIST_TOO_LARGE = ("header_list_too_large", Kind.PROTOCOL, "DPE", None, True)
    HPACK_ERROR = ("hpack_error", Kind.PROTOCOL, "DPE", None, True)
    PUSH_PROMISE = ("push_promise", Kind.PROTOCOL, "DPE", None, True)
    BAD_STREAM_ID = ("bad_stream_id", Kind.PROTOCOL, "DPE", None, True)
    BAD_ENABLE_PUSH = ("bad_enable_push", Kind.PROTOCOL, "DPE", None, True)
    BAD_INITIAL_WINDOW_SIZE = ("bad_initial_window_size", Kind.PROTOCOL, "DPE", None, True)
    BAD_MAX_FRAME_SIZE = ("bad_max_frame_size", Kind.PROTOCOL, "DPE", None, True)
    BAD_STATUS = ("bad_status", Kind.PROTOCOL, "DPE", None, True)
    FLOW_CONTROL_VIOLATION = ("flow_control_violation", Kind.PROTOCOL, "DPE", None, True)
    WINDOW_OVERFLOW = ("window_overflow", Kind.PROTOCOL, "DPE", None, True)
    ZERO_WINDOW_INCREMENT = ("zero_window_increment", Kind.PROTOCOL, "DPE", None, True)
    DATA_ON_IDLE_STREAM = ("data_on_idle_stream", Kind.PROTOCOL, "DPE", None, True)
    DATA_AFTER_END_STREAM = ("data_after_end_stream", Kind.PROTOCOL, "DPE", None, True)
    DATA_BEFORE_RESPONSE = ("data_before_response", Kind.PROTOCOL, "DPE", None, True)
    HEADERS_ON_IDLE_STREAM = ("headers_on_idle_stream", Kind.PROTOCOL, "DPE", None, True)
    HEADERS_ON_CLOSED_STREAM = ("headers_on_closed_stream", Kind.PROTOCOL, "DPE", None, True)
    HEADERS_AFTER_END_STREAM = ("headers_after_end_stream", Kind.PROTOCOL, "DPE", None, True)
    TRAILERS_WITHOUT_END_STREAM = ("trailers_without_end_stream", Kind.PROTOCOL, "DPE", None, True)
    RST_ON_IDLE_STREAM = ("rst_on_idle_stream", Kind.PROTOCOL, "DPE", None, True)
    WINDOW_UPDATE_ON_IDLE_STREAM = ("window_update_on_idle_stream", Kind.PROTOCOL, "DPE", None, True)
    H2_HANDSHAKE_FAILED = ("h2_handshake_failed", Kind.PROTOCOL, "DPE", None, True)
    HTTP1_REQUEST = ("http1_request", Kind.PROTOCOL, "DPE", None, True)
    NOT_TLS = ("not_tls", Kind.PROTOCOL, "DPE", None, True)

    # -- TLS and identity (server side: a refused client; client side: tls_failed, identity_mismatch) --
    NO_CLIENT_CERT = ("no_client_cert", Kind.TLS, "DPE", None, False)
    NO_PEER_CERT = ("no_peer_cert", Kind.TLS, "DPE", None, False)
    WRONG_TLS_VERSION = ("wrong_tls_version", Kind.TLS, "DPE", None, False)
    NO_SHARED_CIPHER = ("no_shared_cipher", Kind.TLS, "DPE", None, False)
    CERT_EXPIRED = ("cert_expired", Kind.TLS, "DPE", None, False)
    CERT_NOT_YET_VALID = ("cert_not_yet_valid", Kind.TLS, "DPE", None, False)
    CERT_REVOKED = ("cert_revoked", Kind.TLS, "DPE", None, False)
    CERT_WRONG_PURPOSE = ("cert_wrong_purpose", Kind.TLS, "DPE", None, False)
    UNTRUSTED_CERT = ("untrusted_cert", Kind.TLS, "DPE", None, False)
    BAD_CERT_SIGNATURE = ("bad_cert_signature", Kind.TLS, "DPE", None, False)
    BAD_CERT = ("bad_cert", Kind.TLS, "DPE", None, False)
    TLS_ALERT = ("tls_alert", Kind.TLS, "DPE", None, False)
    """The peer sent a TLS alert; which one is in the result's `detail`."""
    TLS_ABORTED = ("tls_aborted", Kind.TLS, "DPE", None, False)
    WRONG_TRUST_DOMAIN = ("wrong_trust_domain", Kind.TLS, "DPE", None, False)
    UNEXPECTED_IDENTITY = ("unexpected_identity", Kind.TLS, "DPE", None, False)
    BAD_PEER_IDENTITY = ("bad_peer_identity", Kind.TLS, "DPE", None, False)
    NOT_A_WORKLOAD = ("not_a_workload", Kind.TLS, "DPE", None, False)
    TLS_FAILED = ("tls_failed", Kind.TLS, "UF", None, False)
    IDENTITY_MISMATCH = ("identity_mismatch", Kind.TLS, "UF", None, False)

    # -- local limits and timeouts --
    TOO_MANY_PENDING_HANDSHAKES = ("too_many_pending_handshakes", Kind.LIMIT, "OM", None, False)
    ACCEPT_FAILED = ("accept_failed", Kind.LIMIT, "OM", None, False)
    MAX_CONCURRENT_STREAMS = ("max_concurrent_streams", Kind.LIMIT, "OM", None, False)
    STREAM_UNAVAILABLE = ("stream_unavailable", Kind.LIMIT, "UO", None, False)
    REFUSED_STREAM = ("refused_stream", Kind.LIMIT, "UO", None, False)
    """The HBONE server refused the CONNECT unprocessed (REFUSED_STREAM), also after retries."""
    STREAM_IDS_EXHAUSTED = ("stream_ids_exhausted", Kind.LIMIT, "UO", None, False)
    HANDSHAKE_TIMEOUT = ("handshake_timeout", Kind.TIMEOUT, "DT", None, False)
    H2_HANDSHAKE_TIMEOUT = ("h2_handshake_timeout", Kind.TIMEOUT, "DT", None, False)
    HEADER_BLOCK_TIMEOUT = ("header_block_timeout", Kind.TIMEOUT, "DT", None, False)

    # -- no route to the destination --
    NO_ORIGINAL_DST = ("no_original_dst", Kind.NO_ROUTE, "NR", None, False)
    NO_SERVICE_PORT = ("no_service_port", Kind.NO_ROUTE, "NR", None, False)
    NAMED_TARGET_PORT = ("named_target_port", Kind.NO_ROUTE, "NR", None, False)
    NO_HEALTHY_UPSTREAM = ("no_healthy_upstream", Kind.NO_ROUTE, "UH", 503, False)
    WAYPOINT_MISSING = ("waypoint_missing", Kind.NO_ROUTE, "UH", 503, False)
    """The destination is bound to a waypoint that does not exist or has no address yet: refused
    (fail closed) rather than sent around the waypoint's L7 policy."""

    # -- the destination could not be reached (503) --
    CONNECT_FAILED = ("connect_failed", Kind.UPSTREAM, "UF", 503, False)
    CONNECT_TIMEOUT = ("connect_timeout", Kind.UPSTREAM, "UF", 503, False)
    UPSTREAM_CONNECT_FAILED = ("upstream_connect_failed", Kind.UPSTREAM, "UF", 503, False)
    UPSTREAM_FAILED = ("upstream_failed", Kind.UPSTREAM, "UF", 503, False)
    CONNECT_REJECTED = ("connect_rejected", Kind.UPSTREAM, "UF", 503, False)
    """Outbound: the destination's proxy answered the CONNECT with a status other than 200/401."""

    # -- an established connection ended abnormally --
    PEER_RESET = ("peer_reset", Kind.CLOSED, "DC", None, True)
    """The HBONE peer reset the stream (inbound: the client; outbound: the server)."""
    TCP_RESET = ("tcp_reset", Kind.CLOSED, "UC", None, True)
    """The plain-TCP side of a tunnel was reset (inbound: the app; outbound: the client app)."""
    TCP_CLOSED = ("tcp_closed", Kind.CLOSED, "UC", None, True)
    CONNECTION_RESET = ("connection_reset", Kind.CLOSED, "UC", None, False)
    """A passthrough relay: one of its two sockets was reset."""
    CONNECTION_LOST = ("connection_lost", Kind.CLOSED, "DC", None, True)
    CONNECTION_CLOSED = ("connection_closed", Kind.CLOSED, "DC", None, True)
    STREAM_CLOSED = ("stream_closed", Kind.CLOSED, "DC", None, True)
    GOAWAY = ("goaway", Kind.CLOSED, "DC", None, True)
    POLICY_REVOKED = ("policy_revoked", Kind.POLICY, "DENY", None, False)
    """An open connection closed because a policy change no longer allows it."""
    POD_DELETED = ("pod_deleted", Kind.CLOSED, "UC", None, False)
    """A pod at one end was deleted while the connection was open: ztunnel cut it at once,
    since the pod's netns cannot carry it on (UC: mostly the destination pod)."""
    DRAIN_TIMEOUT = ("drain_timeout", Kind.CLOSED, "-", None, False)
    """ztunnel was restarted and the connection was still open at the end of its drain."""
    POOL_CLOSED = ("pool_closed", Kind.CLOSED, "-", None, False)
    CANCELLED = ("cancelled", Kind.CLOSED, "-", None, False)

    # -- our own failures --
    HANDLER_FAILED = ("handler_failed", Kind.INTERNAL, "-", 503, False)
    INTERNAL_ERROR = ("internal_error", Kind.INTERNAL, "-", 503, False)
    BAD_TRANSITION = ("bad_transition", Kind.INTERNAL, "-", None, False)
    UNEXPECTED = ("unexpected", Kind.INTERNAL, "-", 503, False)
    """Anything `classify` does not know; the exception type goes into the result's detail."""

    # -- HTTP/2 abuse by an authenticated peer (mesh/hbone/abuse.py): GOAWAY ENHANCE_YOUR_CALM --
    RAPID_RESET = ("rapid_reset", Kind.LIMIT, "DPE", None, True)
    """Too many streams reset by the peer before they were answered (CVE-2023-44487)."""
    STREAM_RATE_LIMITED = ("stream_rate_limited", Kind.LIMIT, "DPE", None, True)
    """A new stream above the connection's stream rate: refused with RST_STREAM(REFUSED_STREAM)."""
    STREAM_RATE_EXCEEDED = ("stream_rate_exceeded", Kind.LIMIT, "DPE", None, True)
    """New streams above the rate for too long: the connection is closed."""
    PING_FLOOD = ("ping_flood", Kind.LIMIT, "DPE", None, True)
    SETTINGS_FLOOD = ("settings_flood", Kind.LIMIT, "DPE", None, True)
    CONTROL_FRAME_FLOOD = ("control_frame_flood", Kind.LIMIT, "DPE", None, True)
    """More answers (ACKs, resets) owed to a peer than it reads."""
    EMPTY_FRAME_FLOOD = ("empty_frame_flood", Kind.LIMIT, "DPE", None, True)
    WINDOW_UPDATE_FLOOD = ("window_update_flood", Kind.LIMIT, "DPE", None, True)

    def __init__(self, label: str, kind: Kind, flag: str, status: int | None, mirrored: bool) -> None:
        self.label = label
        self.kind = kind
        self.flag = flag
        self.status = status
        self.mirrored = mirrored

    def flag_for(self, direction: Direction) -> str:
        """The response flag as reported by a proxy on `direction`'s side (see the module docstring)."""
        if self.mirrored and direction is Direction.OUTBOUND:
            return _MIRROR.get(self.flag, self.flag)
        return self.flag

    @classmethod
    def of(cls, label: str) -> Reason:
        """The member with this label (UNEXPECTED for an unknown one)."""
        r = _BY_LABEL.get(label)
        if r is not None:
            return r
        if label.startswith("tls_alert_"):
            return cls.TLS_ALERT
        return cls.UNEXPECTED

    def __str__(self) -> str:
        return self.label


_MIRROR = {"DPE": "UPE", "UPE": "DPE", "DC": "UC", "UC": "DC"}
_BY_LABEL: dict[str, Reason] = {r.label: r for r in Reason}

_MAX_CAUSES = 8


def classify(error: BaseException | str) -> Reason:
    """The one Reason for what a data path caught: an HBONE/relay reason label, or an exception
    (its own stable `reason` label if it has one, else its type, else its causes in turn)."""
    if isinstance(error, str):
        return Reason.of(error)
    seen = 0
    e: BaseException | None = error
    while e is not None and seen < _MAX_CAUSES:
        r = _classify_one(e)
        if r is not None:
            return r
        e = e.__cause__ or e.__context__
        seen += 1
    return Reason.UNEXPECTED


def _classify_one(e: BaseException) -> Reason | None:
    if isinstance(e, ssl.SSLError):        # its `reason` is OpenSSL's, not ours
        return Reason.TLS_FAILED
    label = getattr(e, "reason", None)
    # The mesh's exceptions (TunnelError, Reject, ProtocolError, PlanError, BadAuthority,
    # CaptureError, PeerIdentityError, ...) all carry a stable label in `reason`.
    if isinstance(label, str):
        if label == "connect_rejected" and getattr(e, "status", None) == 401:
            return Reason.CONNECT_DENIED
        r = Reason.of(label)
        return r if r is not Reason.UNEXPECTED else None
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return Reason.CONNECT_TIMEOUT
    if isinstance(e, ConnectionResetError):
        return Reason.CONNECTION_RESET
    if isinstance(e, OSError):
        return Reason.CONNECT_FAILED
    return None
