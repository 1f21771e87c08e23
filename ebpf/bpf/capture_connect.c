/* cgroup/connect4 on every enrolled pod's cgroup: redirect the pod's outbound TCP connects to
 * ztunnel's in-pod listener 127.0.0.1:OUTBOUND_PORT and remember the original destination,
 * keyed by socket cookie, until capture_sockops re-keys it at ACTIVE_ESTABLISHED. */
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

int capture_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->protocol != IPPROTO_TCP)
        return 1;
    /* ztunnel's own sockets.  It runs outside the pod cgroups so they are normally not seen
     * here at all; the mark is the second guard against a redirect loop. */
    struct bpf_sock *sk = ctx->sk;
    if (sk && sk->mark == ZTUNNEL_MARK) {
        count(CNT_CONNECT_SKIP_MARK);
        return 1;
    }
    __u32 dst = ctx->user_ip4;
    if (dst == 0 || is_loopback(dst)) {   /* pod-local traffic, ztunnel's 15001 included */
        count(CNT_CONNECT_SKIP_LOCAL);
        return 1;
    }
#if FAIL_OPEN
    /* Redirect only while ztunnel's outbound listener for this pod exists (the kernel drops
     * it from the SOCKHASH when the socket closes); otherwise connect directly. */
    __u64 netns = bpf_get_netns_cookie(ctx);
    struct bpf_sock *l = (struct bpf_sock *)outbound_listeners.lookup(&netns);
    if (!l) {
        count(CNT_CONNECT_FAIL_OPEN);
        return 1;
    }
    bpf_sk_release(l);
#endif
    /* Fail closed without FAIL_OPEN: if ztunnel is gone, 127.0.0.1:OUTBOUND_PORT refuses. */
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig_dst o = {.ip = dst, .port = (__u16)ctx->user_port};
    pending.update(&cookie, &o);
    ctx->user_ip4 = bpf_htonl(0x7f000001);
    ctx->user_port = bpf_htons(OUTBOUND_PORT);
    count(CNT_CONNECT_REDIRECTED);
    return 1;
}
