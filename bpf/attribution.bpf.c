// SPDX-License-Identifier: GPL-2.0
//
// Socket attribution for ringfence.
//
// Who connected to a protected port? Two cgroup hooks answer it together:
//
//   connect4 / connect6 (cgroup sock_addr) run in the connecting task, so they
//   know pid, uid, gid, comm and cgroup, but the source port is not chosen yet.
//   They park the process facts under the socket cookie in `rf_pending`.
//
//   sock_ops TCP_CONNECT_CB runs once the source address and port exist. It
//   moves the parked facts into `rf_attrib` under the key the agent can build
//   from an accepted connection: (netns cookie, family, client address, client
//   port). It also asks for state callbacks, and deletes the entry when the
//   socket reaches TCP_CLOSE.
//
// Only connections to ports in `rf_ports` are tracked, so unrelated
// connections pay one hash lookup. Every program returns 1: attribution
// observes, it never refuses a connect.
//
// Only UAPI contexts (struct bpf_sock_addr, struct bpf_sock_ops) are read, so
// kernel headers of another release compile a correct program.
//
// RF_MAP_ENTRIES and RF_PENDING_ENTRIES are set by the loader (-D...).

#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include <linux/in.h>

#ifndef RF_MAP_ENTRIES
#define RF_MAP_ENTRIES 65536
#endif
#ifndef RF_PENDING_ENTRIES
#define RF_PENDING_ENTRIES 8192
#endif
#ifndef RF_PORT_ENTRIES
#define RF_PORT_ENTRIES 1024
#endif

#define RF_AF_INET 2
#define RF_AF_INET6 10
#define RF_SOCK_STREAM 1

// The key the agent builds from an accepted socket. IPv4 (and IPv4-mapped
// IPv6) addresses use family 2 and the first 4 bytes of addr; ports are in
// host byte order.
struct rf_key {
    u64 netns_cookie;
    u32 family;
    u16 port;
    u16 pad;
    u8 addr[16];
};

// Process facts taken in the connecting task.
struct rf_proc {
    u64 cgroup_id;
    u32 pid;   // thread group id (the process id userspace sees)
    u32 tid;
    u32 uid;
    u32 gid;
    char comm[16];
};

struct rf_value {
    u64 socket_cookie;
    u64 ktime_ns;      // CLOCK_MONOTONIC at TCP_CONNECT
    struct rf_proc proc;
    u32 dst_family;
    u16 dst_port;      // the destination the socket was connected to (host order)
    u16 pad;
    u8 dst_addr[16];
};

BPF_TABLE("lru_hash", struct rf_key, struct rf_value, rf_attrib, RF_MAP_ENTRIES);
BPF_TABLE("lru_hash", u64, struct rf_proc, rf_pending, RF_PENDING_ENTRIES);
BPF_HASH(rf_ports, u16, u8, RF_PORT_ENTRIES);

static __always_inline int rf_park(struct bpf_sock_addr *ctx)
{
    if (ctx->type != RF_SOCK_STREAM)
        return 1;
    u16 port = ntohs((u16)ctx->user_port);
    if (!rf_ports.lookup(&port))
        return 1;

    struct rf_proc proc = {};
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u64 uid_gid = bpf_get_current_uid_gid();
    proc.pid = pid_tgid >> 32;
    proc.tid = (u32)pid_tgid;
    proc.uid = (u32)uid_gid;
    proc.gid = uid_gid >> 32;
    proc.cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&proc.comm, sizeof(proc.comm));

    u64 cookie = bpf_get_socket_cookie(ctx);
    rf_pending.update(&cookie, &proc);
    return 1;
}

int ringfence_c4(struct bpf_sock_addr *ctx)
{
    return rf_park(ctx);
}

int ringfence_c6(struct bpf_sock_addr *ctx)
{
    return rf_park(ctx);
}

static __always_inline int rf_is_v4_mapped(const u32 *a)
{
    return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

// Fill the key's and the destination's addresses; 0 when the family is not IP.
// The IPv4 addresses of the socket into the key (source) and value (destination).
static __always_inline int rf_addresses_v4(struct bpf_sock_ops *skops, struct rf_key *key,
                                           struct rf_value *val)
{
    u32 src = skops->local_ip4, dst = skops->remote_ip4;
    key->family = RF_AF_INET;
    __builtin_memcpy(key->addr, &src, 4);
    if (val) {
        val->dst_family = RF_AF_INET;
        __builtin_memcpy(val->dst_addr, &dst, 4);
    }
    return 1;
}

static __always_inline int rf_addresses(struct bpf_sock_ops *skops, struct rf_key *key,
                                        struct rf_value *val)
{
    if (skops->family == RF_AF_INET)
        return rf_addresses_v4(skops, key, val);
    if (skops->family != RF_AF_INET6)
        return 0;

    u32 dst6[4] = {skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2],
                   skops->remote_ip6[3]};
    if (rf_is_v4_mapped(dst6)) {
        // An AF_INET6 socket talking IPv4: the IPv4 fields hold the addresses
        // (local_ip6 is filled in only after TCP_CONNECT for such sockets).
        return rf_addresses_v4(skops, key, val);
    }
    u32 src6[4] = {skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2],
                   skops->local_ip6[3]};
    key->family = RF_AF_INET6;
    __builtin_memcpy(key->addr, src6, 16);
    if (val) {
        val->dst_family = RF_AF_INET6;
        __builtin_memcpy(val->dst_addr, dst6, 16);
    }
    return 1;
}

int ringfence_sops(struct bpf_sock_ops *skops)
{
    u32 op = skops->op;

    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        u64 cookie = bpf_get_socket_cookie(skops);
        struct rf_proc *proc = rf_pending.lookup(&cookie);
        if (!proc)
            return 1;

        struct rf_key key = {};
        struct rf_value val = {};
        if (rf_addresses(skops, &key, &val)) {
            key.netns_cookie = bpf_get_netns_cookie(skops);
            key.port = (u16)skops->local_port;
            val.socket_cookie = cookie;
            val.ktime_ns = bpf_ktime_get_ns();
            val.proc = *proc;
            val.dst_port = (u16)bpf_ntohl(skops->remote_port);
            rf_attrib.update(&key, &val);
            bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
                                                 BPF_SOCK_OPS_STATE_CB_FLAG);
        }
        rf_pending.delete(&cookie);
        return 1;
    }

    if (op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == BPF_TCP_CLOSE) {
        struct rf_key key = {};
        if (rf_addresses(skops, &key, 0)) {
            key.netns_cookie = bpf_get_netns_cookie(skops);
            key.port = (u16)skops->local_port;
            // Delete only this socket's entry, never a newer one under the same key.
            struct rf_value *val = rf_attrib.lookup(&key);
            if (val && val->socket_cookie == bpf_get_socket_cookie(skops))
                rf_attrib.delete(&key);
        }
    }
    return 1;
}
