/* Small pure helpers shared by the capture programs (no map access: see maps.h). */
#ifndef CAPTURE_HELPERS_H
#define CAPTURE_HELPERS_H

/* 127.0.0.0/8, from an address in network byte order. */
static __always_inline int is_loopback(__u32 ip_be)
{
    return (bpf_ntohl(ip_be) >> 24) == 127;
}

#endif /* CAPTURE_HELPERS_H */
