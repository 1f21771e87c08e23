/* Every map of the capture programs.  All are pinned under MAPS_PIN_DIR, so the four bcc
 * modules (one per attach point) share them, and they outlive a ztunnel restart.
 *
 * Map methods (.lookup/.update) only work in a program's main .c file: bcc rewrites them
 * there and nowhere else (not in headers, not in macros). */
#ifndef CAPTURE_MAPS_H
#define CAPTURE_MAPS_H

#include "config.h"
#include "types.h"

/* pending: writer capture_connect4 (at redirect); reader + deleter capture_sockops (at
 * ACTIVE_ESTABLISHED).  key: socket cookie (u64) of the app's socket.  value: struct
 * orig_dst.  LRU so that connects which never establish are evicted instead of leaking. */
BPF_TABLE_PINNED("lru_hash", __u64, struct orig_dst, pending, ORIG_DST_ENTRIES,
                 MAPS_PIN_DIR "/pending");

/* orig_dst: writer capture_sockops (and deleter, for direct loopback connects that would
 * otherwise inherit a stale entry); reader capture_getsockopt (ztunnel's
 * getsockopt(SO_ORIGINAL_DST)).  key: struct conn_key.  value: struct orig_dst.  LRU: entries
 * are not deleted on read, so repeated getsockopt calls agree; old ones age out. */
BPF_TABLE_PINNED("lru_hash", struct conn_key, struct orig_dst, orig_dst, ORIG_DST_ENTRIES,
                 MAPS_PIN_DIR "/orig_dst");

/* inbound_listeners (SOCKHASH): writer ebpf/capture.py enroll()/release() of every worker
 * (its own slot); the kernel drops an entry when its socket closes (that worker died).
 * reader capture_sk_lookup (first slot found).  key: struct listener_key {pod ip, kind,
 * worker}.  value: that worker's in-pod 15006/15008 listening socket. */
BPF_TABLE_PINNED("sockhash", struct listener_key, int, inbound_listeners, 2 * MAX_PODS * MAX_WORKERS,
                 MAPS_PIN_DIR "/inbound_listeners");

/* outbound_listeners (SOCKHASH): writer ebpf/capture.py enroll()/release() of every worker
 * (kernel drops entries on close).  reader capture_connect4, only when FAIL_OPEN (is any
 * worker alive for this pod?).  key: struct outbound_key {pod netns cookie, worker}.
 * value: that worker's 127.0.0.1:15001 listener. */
BPF_TABLE_PINNED("sockhash", struct outbound_key, int, outbound_listeners, MAX_PODS * MAX_WORKERS,
                 MAPS_PIN_DIR "/outbound_listeners");

/* pods: writer ebpf/capture.py enroll()/release().  readers capture_sk_lookup (is the local
 * address an enrolled pod?) and ebpf/capture.py (what a previous ztunnel enrolled).
 * key: pod IPv4 address (u32, network order).  value: struct pod_info. */
BPF_TABLE_PINNED("hash", __u32, struct pod_info, pods, MAX_PODS, MAPS_PIN_DIR "/pods");

/* ztunnel_dials: writer + deleter capture_ztunnel_sockops (ztunnel's cgroup: from the dial's
 * TCP_CONNECT_CB until it leaves SYN_SENT); reader capture_sk_lookup (pass that SYN to the
 * app).  key: struct dial_key.  value: u32 1.  LRU: bounded even if a delete were missed. */
BPF_TABLE_PINNED("lru_hash", struct dial_key, __u32, ztunnel_dials, ORIG_DST_ENTRIES,
                 MAPS_PIN_DIR "/ztunnel_dials");

/* counters: writer every program (atomic add); reader ebpf/capture.py stats().
 * key: enum capture_counter.  value: u64 event count since the maps were created. */
BPF_TABLE_PINNED("array", __u32, __u64, counters, CNT__MAX, MAPS_PIN_DIR "/counters");

#endif /* CAPTURE_MAPS_H */
