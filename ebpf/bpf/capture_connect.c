/* cgroup/connect4 and cgroup/connect6 on every enrolled pod's cgroup: redirect the pod's
 * outbound TCP connects to ztunnel's in-pod listener 127.0.0.1:OUTBOUND_PORT and remember the
 * original destination, keyed by socket cookie, until capture_sockops re-keys it at
 * ACTIVE_ESTABLISHED.  One file for both hooks: they share redirect(), and bcc rewrites map
 * methods only in a program's main file.
 *
 * connect6 exists for dual-stack sockets: an AF_INET6 socket connecting to an IPv4-mapped
 * address (::ffff:a.b.c.d, as grpcio and many runtimes do) runs the inet6 hook only, never
 * connect4, and would otherwise leave the pod uncaptured.  The mesh is IPv4-only, so a pure
 * IPv6 destination other than loopback is refused (EPERM): capture cannot carry it, and
 * letting it through would be plaintext leaving the pod around the mesh. */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include "include/maps.h"
#include "include/helpers.h"

/* Here, not in a header: bcc rewrites map methods only in the main file. */
static __always_inline void count(__u32 idx)
{
    __u64 *v = counters.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
}

/* 1: leave the connect alone (ztunnel's socket, or pod-local); 0: capture it. */
static __always_inline int skip(struct bpf_sock_addr *ctx, __u32 dst)
{
    /* ztunnel's own sockets.  It runs outside the pod cgroups so they are normally not seen
     * here at all; the mark is the second guard against a redirect loop. */
    struct bpf_sock *sk = ctx->sk;
    if (sk && sk->mark == ZTUNNEL_MARK) {
        count(CNT_CONNECT_SKIP_MARK);
        return 1;
    }
    if (dst == 0 || is_loopback(dst)) {   /* pod-local traffic, ztunnel's 15001 included */
        count(CNT_CONNECT_SKIP_LOCAL);
        return 1;
    }
    return 0;
}

/* Record the original IPv4 destination; 1 if the caller rewrites the address to
 * 127.0.0.1:OUTBOUND_PORT, 0 if it must connect directly (FAIL_OPEN, ztunnel gone). */
static __always_inline int redirect(struct bpf_sock_addr *ctx, __u32 dst)
{
#if FAIL_OPEN
    /* Redirect only while some worker's outbound listener for this pod exists (the kernel
     * drops it from the SOCKHASH when the socket closes); otherwise connect directly. */
    struct outbound_key ok = {.netns_cookie = bpf_get_netns_cookie(ctx)};
    struct bpf_sock *l = 0;
#pragma unroll
    for (__u32 w = 0; w < MAX_WORKERS; w++) {
        ok.worker = w;
        l = (struct bpf_sock *)outbound_listeners.lookup(&ok);
        if (l)
            break;
    }
    if (!l) {
        count(CNT_CONNECT_FAIL_OPEN);
        return 0;
    }
    bpf_sk_release(l);
#endif
    /* Fail closed without FAIL_OPEN: if ztunnel is gone, 127.0.0.1:OUTBOUND_PORT refuses. */
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig_dst o = {.ip = dst, .port = (__u16)ctx->user_port};
    pending.update(&cookie, &o);
    ctx->user_port = bpf_htons(OUTBOUND_PORT);
    count(CNT_CONNECT_REDIRECTED);
    return 1;
}

int capture_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return 1;
    __u32 dst = ctx->user_ip4;
    if (skip(ctx, dst))
        return 1;
    if (redirect(ctx, dst))
        ctx->user_ip4 = bpf_htonl(0x7f000001);
    return 1;
}

int capture_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return 1;
    __u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2];
    __u32 a3 = ctx->user_ip6[3];
    if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff)) {
        /* ::ffff:a.b.c.d: an IPv4 connection on the wire, captured exactly like connect4;
         * the rewritten address stays v4-mapped (::ffff:127.0.0.1). */
        if (skip(ctx, a3))
            return 1;
        if (redirect(ctx, a3)) {
            ctx->user_ip6[3] = bpf_htonl(0x7f000001);
            count(CNT_CONNECT6_MAPPED);
        }
        return 1;
    }
    /* Pure IPv6: :: and ::1 stay pod-local; anything else cannot be carried by the mesh. */
    if (a0 == 0 && a1 == 0 && a2 == 0 && (a3 == 0 || a3 == bpf_htonl(1))) {
        count(CNT_CONNECT_SKIP_LOCAL);
        return 1;
    }
    struct bpf_sock *sk = ctx->sk;
    if (sk && sk->mark == ZTUNNEL_MARK) {   /* ztunnel never dials IPv6, but its mark is law */
        count(CNT_CONNECT_SKIP_MARK);
        return 1;
    }
    count(CNT_CONNECT6_REFUSED);
    return 0;                               /* connect() fails with EPERM */
}
