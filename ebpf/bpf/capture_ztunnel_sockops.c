/* sock_ops on ztunnel's own cgroup: record ztunnel's in-flight dials to a pod's app that carry
 * the client's address as source (IP_TRANSPARENT, SO_MARK INBOUND_MARK), so capture_sk_lookup
 * lets exactly those SYNs through to the app instead of steering them back into ztunnel.
 *
 * sk_lookup sees neither the mark nor the socket of a SYN, and ztunnel's dial arrives from
 * the client's pod IP like any connection from the network; its 4-tuple is what tells them
 * apart.  The entry exists from TCP_CONNECT_CB (the port is chosen, the SYN not yet sent) until
 * the dial leaves SYN_SENT (established or failed: STATE_CB), so a retransmitted SYN still
 * finds it and no stale entry waits for a later connection from the same client port. */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include "include/maps.h"
#include "include/helpers.h"

#define TCP_SYN_SENT 2   /* include/net/tcp_states.h */

/* Here, not in a header: bcc rewrites map methods only in the main file. */
static __always_inline void count(__u32 idx)
{
    __u64 *v = counters.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
}

int capture_ztunnel_sockops(struct bpf_sock_ops *skops)
{
    if (skops->family != AF_INET)
        return 1;
    __u32 op = skops->op;
    if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB)
        return 1;
    /* ztunnel's dial: local = the client's address it took, remote = the app. */
    struct dial_key k = {
        .app_ip = skops->remote_ip4,
        .client_ip = skops->local_ip4,
        .app_port = (__u16)bpf_ntohl(skops->remote_port),  /* sock_ops: be16 in the high half */
        .client_port = (__u16)skops->local_port,
    };
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        struct bpf_sock *sk = skops->sk;
        if (!sk || sk->mark != INBOUND_MARK)
            return 1;                /* any other ztunnel socket: not ours to track */
        __u32 one = 1;
        ztunnel_dials.update(&k, &one);
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
        count(CNT_ZTUNNEL_DIAL_RECORDED);
        return 1;
    }
    /* STATE_CB (only on the sockets flagged above): args[0] is the old state. */
    if (skops->args[0] != TCP_SYN_SENT)
        return 1;
    ztunnel_dials.delete(&k);
    bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_STATE_CB_FLAG);
    return 1;
}
