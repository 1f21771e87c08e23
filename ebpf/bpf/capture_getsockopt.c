/* cgroup/getsockopt on ztunnel's own cgroup: answer getsockopt(SOL_IP, SO_ORIGINAL_DST) on a
 * socket ztunnel accepted from its in-pod outbound listener, from the orig_dst map (the
 * Merbridge approach).  Only processes in that cgroup get answers, so ztunnel must call it
 * from there.  Every other getsockopt passes through untouched. */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include "include/maps.h"
#include "include/helpers.h"

#define SO_ORIGINAL_DST 80   /* linux/netfilter_ipv4.h */

/* Here, not in a header: bcc rewrites map methods only in the main file. */
static __always_inline void count(__u32 idx)
{
    __u64 *v = counters.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
}

int capture_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    /* Only sockets accepted on the outbound listener: local port OUTBOUND_PORT. */
    if (!sk || sk->family != AF_INET || sk->src_port != OUTBOUND_PORT)
        return 1;
    struct conn_key k = {
        .netns_cookie = bpf_get_netns_cookie(ctx),
        .ip = sk->dst_ip4,                    /* accepted socket: its peer is the client */
        .port = bpf_ntohs(sk->dst_port),
    };
    struct orig_dst *o = orig_dst.lookup(&k);
    if (!o) {
        count(CNT_GETSOCKOPT_MISS);
        return 1;                             /* the kernel's own error (ENOENT/ENOPROTOOPT) */
    }
    struct sockaddr_in *sa = ctx->optval;
    if ((void *)(sa + 1) > ctx->optval_end)
        return 1;                             /* caller's buffer is shorter than sockaddr_in */
    sa->sin_family = AF_INET;
    sa->sin_port = o->port;
    sa->sin_addr.s_addr = o->ip;
    /* volatile: clang otherwise merges these two adjacent 32-bit context stores into one
     * 64-bit store, which the verifier rejects ("invalid bpf_context access off=32 size=8"). */
    *(volatile int *)&ctx->optlen = sizeof(*sa);
    *(volatile int *)&ctx->retval = 0;
    count(CNT_GETSOCKOPT_ANSWERED);
    return 1;
}
