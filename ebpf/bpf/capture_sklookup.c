/* sk_lookup on every enrolled pod's netns: steer TCP connections arriving for the pod IP to
 * ztunnel's in-pod listeners (HBONE_PORT -> the HBONE listener, any other port -> the
 * INBOUND_PORT listener).  getsockname() on the accepted socket keeps the original
 * destination, so ztunnel needs no map for inbound.
 *
 * ztunnel's own hop to the app must not be steered back to it: it dials from the pod IP
 * (remote == local) or, to keep the client's address visible to the app, from the client's
 * IP with IP_TRANSPARENT; those dials are in ztunnel_dials (capture_ztunnel_sockops).  The
 * mesh is IPv4-only: an IPv6 SYN from off the pod (the node or a neighbour over link-local)
 * is dropped rather than reaching the app around ztunnel's policy. */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include "include/maps.h"
#include "include/helpers.h"

#if FAIL_OPEN
#define VERDICT_NO_LISTENER SK_PASS   /* normal lookup: the app answers directly */
#else
#define VERDICT_NO_LISTENER SK_DROP   /* no socket: the client gets a RST (refused) */
#endif

/* Here, not in a header: bcc rewrites map methods only in the main file. */
static __always_inline void count(__u32 idx)
{
    __u64 *v = counters.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline int lookup6(struct bpf_sk_lookup *ctx)
{
    __u32 r0 = ctx->remote_ip6[0], r1 = ctx->remote_ip6[1], r2 = ctx->remote_ip6[2];
    __u32 r3 = ctx->remote_ip6[3];
    int same = r0 == ctx->local_ip6[0] && r1 == ctx->local_ip6[1] && r2 == ctx->local_ip6[2]
               && r3 == ctx->local_ip6[3];
    if (same || (r0 == 0 && r1 == 0 && r2 == 0 && r3 == bpf_htonl(1))) {   /* pod-local, ::1 */
        count(CNT_SKLOOKUP_SKIP_LOCAL);
        return SK_PASS;
    }
    count(CNT_SKLOOKUP_V6_REFUSED);
    return SK_DROP;
}

int capture_sk_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    if (ctx->family == AF_INET6)
        return lookup6(ctx);
    if (ctx->family != AF_INET)
        return SK_PASS;
    __u32 local = ctx->local_ip4;
    __u32 remote = ctx->remote_ip4;
    /* ztunnel's own hop to the app comes from a socket in the pod netns, i.e. from the pod IP,
     * and pod-local traffic from 127/8.  ctx->ingress_ifindex cannot tell: for locally
     * generated traffic to the pod IP it reports eth0, not lo (measured: a redirect loop). */
    if (remote == local || is_loopback(remote)) {
        count(CNT_SKLOOKUP_SKIP_LOCAL);
        return SK_PASS;
    }
    if (!pods.lookup(&local)) {
        count(CNT_SKLOOKUP_NOT_POD);
        return SK_PASS;
    }
    struct dial_key d = {.app_ip = local, .client_ip = remote, .app_port = (__u16)ctx->local_port,
                         .client_port = bpf_ntohs(ctx->remote_port)};
    if (ztunnel_dials.lookup(&d)) {
        count(CNT_SKLOOKUP_ZTUNNEL_DIAL);
        return SK_PASS;
    }
    int hbone = ctx->local_port == HBONE_PORT;
    struct listener_key k = {.pod_ip = local, .kind = hbone ? LISTENER_HBONE : LISTENER_INBOUND};
    struct bpf_sock *sk = 0;
    /* Any live worker's listener will do: the reuseport group behind it spreads connections
     * over all of them, so no worker (not even 0) is one that capture depends on. */
#pragma unroll
    for (__u32 w = 0; w < MAX_WORKERS; w++) {
        k.worker = w;
        sk = (struct bpf_sock *)inbound_listeners.lookup(&k);
        if (sk)
            break;
    }
    if (!sk) {
        count(CNT_SKLOOKUP_NO_LISTENER);
        return VERDICT_NO_LISTENER;
    }
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (err) {
        count(CNT_SKLOOKUP_ASSIGN_ERROR);
        return VERDICT_NO_LISTENER;
    }
    count(hbone ? CNT_SKLOOKUP_HBONE : CNT_SKLOOKUP_INBOUND);
    return SK_PASS;
}
