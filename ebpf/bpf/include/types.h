/* The single source of truth for every layout shared by the capture programs and Python.
 * ebpf/maps.py mirrors the structs in ctypes (ztunnel runs without bcc) and reads the enums
 * and POD_UID_MAX from this file; tests/ebpf/test_layout.py checks the mirrors against bcc's
 * view of the compiled maps and has the C compiler assert every size, offset and value.
 * Change a struct here and in ebpf/maps.py together. */
#ifndef CAPTURE_TYPES_H
#define CAPTURE_TYPES_H

/* Original destination of a redirected connect(), both fields in network byte order exactly
 * as in struct sockaddr_in, so capture_getsockopt copies them without conversion. */
struct orig_dst {
    __u32 ip;
    __u16 port;
    __u16 _pad;
};

/* The client end of a redirected connection, as ztunnel sees it on the accepted socket:
 * the pod's netns cookie (every pod's client is 127.0.0.1:<ephemeral>, so the address alone
 * is ambiguous), the client's IPv4 address (network order) and port (host order). */
struct conn_key {
    __u64 netns_cookie;
    __u32 ip;
    __u32 port;
};

/* ztunnel's in-flight dial to a pod's app with the client's address as source, as
 * capture_sk_lookup sees its SYN: the app's IPv4 address and the client's (network order),
 * the app's port and ztunnel's source port (host order). */
struct dial_key {
    __u32 app_ip;
    __u32 client_ip;
    __u16 app_port;
    __u16 client_port;
};

/* Which in-pod inbound listener a SOCKHASH entry is. */
enum listener_kind {
    LISTENER_INBOUND = 0,   /* 0.0.0.0:INBOUND_PORT, plaintext */
    LISTENER_HBONE = 1,     /* 0.0.0.0:HBONE_PORT */
};

/* Slots per pod in the listener SOCKHASHes, one per ztunnel worker of the node: every
 * worker puts its own in-pod listeners in its slot, so when one worker dies (the kernel drops
 * its sockets from the maps) the programs still find another's.  The listeners of a pod share
 * the port with SO_REUSEPORT, and bpf_sk_assign honours the reuseport group, so whichever
 * slot is found, the kernel spreads connections over every live worker. */
#define MAX_WORKERS 16

/* Key of the inbound listener SOCKHASH: pod IPv4 address (network order), kind, and the
 * worker whose listener it is (0 .. MAX_WORKERS-1). */
struct listener_key {
    __u32 pod_ip;
    __u32 kind;
    __u32 worker;
};

/* Key of the outbound listener SOCKHASH: the pod's netns cookie and the worker. */
struct outbound_key {
    __u64 netns_cookie;
    __u32 worker;
    __u32 _pad;
};

#define POD_UID_MAX 128

/* An enrolled pod, keyed by its IP.  sk_lookup only needs the key's presence ("this local
 * address is an enrolled pod"); the rest lets a restarted ztunnel find and release what a
 * previous one enrolled. uid is NUL-padded (not necessarily NUL-terminated at full length). */
struct pod_info {
    __u64 netns_cookie;
    __u64 netns_ino;
    __u64 cgroup_id;
    char uid[POD_UID_MAX];
};

/* Indices of the counters array; Python names them by dropping CNT_ and lower-casing. */
enum capture_counter {
    CNT_CONNECT_REDIRECTED = 0,     /* connect4: rewritten to 127.0.0.1:OUTBOUND_PORT */
    CNT_CONNECT_SKIP_MARK,          /* connect4: ztunnel's own socket (SO_MARK) */
    CNT_CONNECT_SKIP_LOCAL,         /* connect4: destination 127/8 or 0.0.0.0 */
    CNT_CONNECT_FAIL_OPEN,          /* connect4: no outbound listener, FAIL_OPEN let it through */
    CNT_SOCKOPS_REKEYED,            /* sock_ops: pending entry moved to orig_dst */
    CNT_GETSOCKOPT_ANSWERED,        /* getsockopt: SO_ORIGINAL_DST answered */
    CNT_GETSOCKOPT_MISS,            /* getsockopt: SO_ORIGINAL_DST asked, no entry */
    CNT_SKLOOKUP_INBOUND,           /* sk_lookup: steered to the INBOUND_PORT listener */
    CNT_SKLOOKUP_HBONE,             /* sk_lookup: steered to the HBONE_PORT listener */
    CNT_SKLOOKUP_SKIP_LOCAL,        /* sk_lookup: remote is the pod itself or 127/8 */
    CNT_SKLOOKUP_NOT_POD,           /* sk_lookup: local address is not an enrolled pod IP */
    CNT_SKLOOKUP_NO_LISTENER,       /* sk_lookup: enrolled pod, listener gone (ztunnel down) */
    CNT_SKLOOKUP_ASSIGN_ERROR,      /* sk_lookup: bpf_sk_assign failed */
    CNT_CONNECT6_MAPPED,            /* connect6: v4-mapped destination redirected */
    CNT_CONNECT6_REFUSED,           /* connect6: pure IPv6 destination refused (EPERM) */
    CNT_ZTUNNEL_DIAL_RECORDED,      /* ztunnel sock_ops: a source-preserving dial to an app */
    CNT_SKLOOKUP_ZTUNNEL_DIAL,      /* sk_lookup: that dial's SYN, passed to the app */
    CNT_SKLOOKUP_V6_REFUSED,        /* sk_lookup: IPv6 SYN from off the pod, dropped */
    CNT__MAX,
};

#endif /* CAPTURE_TYPES_H */
