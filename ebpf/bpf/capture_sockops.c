/* sock_ops on every enrolled pod's cgroup: when a redirected connect completes, move its
 * original destination from the socket cookie to the key ztunnel can compute from its
 * accepted socket: {pod netns cookie, client ip, client port}.  A dual-stack (AF_INET6) socket
 * that connect6 redirected is IPv4 on the wire and is keyed the same.
 *
 * No race with ztunnel: the client's ACTIVE_ESTABLISHED callback runs before it sends the
 * final ACK of the handshake, so the entry exists before ztunnel's accept() returns. */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include "include/maps.h"
#include "include/helpers.h"

/* Here, not in a header: bcc rewrites map methods only in the main file. */
static __always_inline void count(__u32 idx)
{
    __u64 *v = counters.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
}

int capture_sockops(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        return 1;
    /* A dual-stack (AF_INET6) socket that connect6 redirected to ::ffff:127.0.0.1 has its
     * IPv4 address in local_ip4 as well (the kernel connected it through tcp_v4_connect).
     * (Reading local_ip6 here too makes clang share one ctx pointer, which the verifier
     * refuses.)  Pure IPv6 sockets show 127.0.0.6 there and have no pending entry. */
    if (skops->family != AF_INET && skops->family != AF_INET6)
        return 1;
    __u32 local_ip = skops->local_ip4;
    if (!is_loopback(local_ip))   /* redirected connects always come from 127.0.0.1 */
        return 1;
    struct conn_key k = {
        .netns_cookie = bpf_get_netns_cookie(skops),
        .ip = local_ip,
        .port = skops->local_port,
    };
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct orig_dst *o = pending.lookup(&cookie);
    if (!o) {
        /* A direct loopback connect: make sure it never inherits the original destination
         * of an earlier redirected connection that used the same port. */
        orig_dst.delete(&k);
        return 1;
    }
    struct orig_dst v = *o;
    orig_dst.update(&k, &v);
    pending.delete(&cookie);
    count(CNT_SOCKOPS_REKEYED);
    return 1;
}
