/* Compile-time knobs of the capture programs: defaults here, overridden with -DNAME=value by
 * ebpf/loader.py (never by editing source text).  Ports are host byte order. */
#ifndef CAPTURE_CONFIG_H
#define CAPTURE_CONFIG_H

/* ztunnel's in-pod outbound listener, 127.0.0.1:OUTBOUND_PORT in every enrolled pod netns. */
#ifndef OUTBOUND_PORT
#define OUTBOUND_PORT 15001
#endif

/* ztunnel's in-pod plaintext inbound listener (0.0.0.0:INBOUND_PORT). */
#ifndef INBOUND_PORT
#define INBOUND_PORT 15006
#endif

/* ztunnel's in-pod HBONE listener (0.0.0.0:HBONE_PORT); connections to this port of the pod
 * IP go to it, every other port goes to the INBOUND_PORT listener. */
#ifndef HBONE_PORT
#define HBONE_PORT 15008
#endif

/* SO_MARK on ztunnel's own sockets: connect4 never redirects them (loop guard). */
#ifndef ZTUNNEL_MARK
#define ZTUNNEL_MARK 0x539
#endif

/* SO_MARK on ztunnel's dials to a pod's app that keep the client's address as source
 * (IP_TRANSPARENT; Istio's 0x111).  capture_ztunnel_sockops records those dials so that
 * sk_lookup passes them; the pod netns routes this mark to lo (ip rule fwmark 0x111/0xfff
 * lookup 133, local 0.0.0.0/0 dev lo table 133) and tcp_fwmark_accept=1 gives the app's
 * accepted socket the mark, so its replies come back to ztunnel instead of leaving on eth0. */
#ifndef INBOUND_MARK
#define INBOUND_MARK 0x111
#endif

/* 0 = fail closed: with ztunnel's listeners gone, captured connections are refused.
 * 1 = fail open: they go directly to their destination, unproxied. */
#ifndef FAIL_OPEN
#define FAIL_OPEN 0
#endif

/* Directory (on bpffs) where the maps are pinned and shared by all four programs; every
 * program is compiled as its own bcc module, so pinning is how they find one map. */
#ifndef MAPS_PIN_DIR
#error "MAPS_PIN_DIR must be set, e.g. -DMAPS_PIN_DIR=\"/sys/fs/bpf/ambient/maps\""
#endif

/* Capacities.  Both original-destination maps are LRU, so these bound memory, not
 * correctness, as long as fewer connections than this are between connect() and accept(). */
#ifndef ORIG_DST_ENTRIES
#define ORIG_DST_ENTRIES 65536
#endif
#ifndef MAX_PODS
#define MAX_PODS 1024
#endif

#endif /* CAPTURE_CONFIG_H */
