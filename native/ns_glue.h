/*
 * x2ssh netstack: the C core between raw IP packets and lwIP.
 *
 * Theory of operation. Packets come in one at a time (ns_input) or in batches straight from a TUN fd
 * (ns_pump). The glue validates each one; UDP and ICMP echo requests are parsed here and become events;
 * other ICMP, fragments and anything else is dropped and counted; TCP goes to lwIP. A SYN for a new 4-tuple is held back: the
 * glue records a pending flow and emits NS_EV_TCP_CONNECT, and lwIP sees the SYN only when the consumer
 * calls ns_tcp_accept (or the app gets a RST from ns_tcp_refuse). To accept any destination the glue
 * writes the packet's destination into the single netif's address just before lwIP's input (never
 * netif_set_addr, which kills pcbs); listeners are created per destination port on first accept.
 *
 * lwIP callbacks never call Python: they only append compact records to an event array that Python
 * drains after each batch. Received TCP data stays in lwIP pbufs until read; the receive window opens
 * only when the consumer acknowledges bytes it has passed on (ns_tcp_ack). Output packets go straight to
 * the TUN fd when one is set, otherwise into a queue drained by ns_out_take (the sans-IO mode).
 *
 * Per-connection economy (the peer is the local kernel): data from ns_tcp_write leaves at ns_flush, once
 * per turn of the caller's loop, so an answer and its FIN share a segment. A segment that ends the app's
 * write (PSH), and bytes the consumer acknowledges, make an ACK owed at once (no 250 ms delayed-ACK
 * stalls); ns_flush sends it with any data written meanwhile, and ns_flush_acks sends the ones still owed
 * as bare ACKs, after the caller's own sends of the turn (the ACK is not on the request's path). A flow's
 * first owed ACK may wait a few milliseconds longer (the caller's choice) for the answer to carry it. TIME_WAIT
 * pcbs are freed at once (a flow the consumer has not released yet keeps its unread bytes, without a pcb,
 * until ns_tcp_close). A graceful close never loses received bytes: when lwIP ends a connection (the app's
 * ACK of our FIN, after its own FIN) while bytes are unread, the flow keeps them without a pcb and
 * NS_EV_TCP_CLOSED (NORMAL) comes once ns_tcp_read has taken the last of them; a reset drops them.
 * Received bytes wait in a queue with its own size_t count (a pbuf chain's 16-bit tot_len would wrap).
 * A flow's TCP events are never lost: one the queue has no room for (out of memory) waits on its flow and
 * comes, in order, with a later ns_events. Accepts stay O(1) with many live flows: lwIP's walk of its
 * active pcbs for a new SYN is skipped when no pcb can have the 4-tuple (released flows' pcbs are counted
 * by 4-tuple hash through lwIP's pcb destroy hook); other segments still walk it (lwIP moves a found pcb
 * to the front), as do lwIP's timers once per tick.
 *
 * All functions must be called from one thread. lwIP has global state: one stack per process.
 */
#ifndef X2SSH_NS_GLUE_H
#define X2SSH_NS_GLUE_H

#include <stddef.h>
#include <stdint.h>

#define NS_ABI_VERSION 6  /* bump when the C interface changes (2: ICMP, buffer accounting, flush; 3: acks;
                           * 4: held acks; 5: events_deferred, syn_fast_path, ns_test_freeze_events;
                           * 6: ns_set_verify_checksums) */

enum ns_event_type {
    NS_EV_TCP_CONNECT = 1,  /* a new SYN waits for ns_tcp_accept / ns_tcp_refuse; addresses filled */
    NS_EV_TCP_READABLE = 2, /* received data waits in ns_tcp_read */
    NS_EV_TCP_EOF = 3,      /* the app sent FIN (after all its data) */
    NS_EV_TCP_WRITABLE = 4, /* a short ns_tcp_write may be retried: the send buffer drained */
    NS_EV_TCP_CLOSED = 5,   /* the connection is gone (err says why); release with ns_tcp_close. NORMAL
                             * comes after the last unread byte was read (RESET... at once, bytes dropped) */
    NS_EV_UDP = 6,          /* a datagram: addresses filled, payload at arena + off, len bytes */
};

/* Reasons carried by NS_EV_TCP_CLOSED. */
enum ns_close_reason {
    NS_CLOSED_NORMAL = 0,   /* both sides finished */
    NS_CLOSED_RESET = 1,    /* the app sent RST */
    NS_CLOSED_TIMEOUT = 2,  /* retransmissions gave up */
    NS_CLOSED_ERROR = 3,    /* any other lwIP error */
};

/* Results of calls (negative: error). */
enum ns_result {
    NS_OK = 0,
    NS_ENOFLOW = -1,    /* unknown or already released flow id */
    NS_ESTATE = -2,     /* not allowed in the flow's state (e.g. accept twice, write after shutdown) */
    NS_ECLOSED = -3,    /* the connection is gone */
    NS_EMEM = -4,       /* out of memory */
    NS_ETOOBIG = -5,    /* a datagram that does not fit the MTU */
    NS_EINVAL = -6,     /* bad argument */
};

typedef struct {
    uint32_t type;
    uint32_t flow;
    int32_t err;
    uint32_t off;
    uint32_t len;
    uint16_t sport;
    uint16_t dport;
    uint8_t family;     /* 4 or 6 */
    uint8_t pad[3];
    uint8_t src[16];
    uint8_t dst[16];
} ns_event;

typedef struct {
    uint64_t packets_in, bytes_in, packets_out, bytes_out;
    uint64_t dropped_malformed, dropped_checksum, dropped_fragment, dropped_icmp, dropped_other;
    uint64_t dropped_output, udp_in, udp_out, tcp_refused, tcp_over_limit;
    uint64_t flows_live, flows_pending, pcbs_active, pcbs_time_wait, listeners, mem_in_use;
    uint64_t events_deferred; /* TCP events that found the queue full (out of memory) and came later */
    uint64_t syn_fast_path;   /* accepts whose SYN skipped lwIP's walk of the active pcbs (ns_tcp_accept) */
} ns_stats;

int ns_version(void);
/* Open the (single) stack; mtu bounds the packets we emit and the MSS we advertise. */
int ns_open(int mtu, int max_flows);
void ns_close(void);
/* -1: queue output for ns_out_take; otherwise write every output packet to this fd. */
void ns_set_output_fd(int fd);
/* Whether TCP and UDP checksums of input packets are verified (1, the default after ns_open). 0 when every
 * packet comes from the local kernel (a TUN device), which computed them over the same memory: a second
 * pass over every byte buys nothing there. Malformed headers are still dropped either way. */
void ns_set_verify_checksums(int on);
/* Manual clock for deterministic tests: when set, lwIP's time is now_ms instead of CLOCK_MONOTONIC. */
void ns_set_clock(int manual, uint64_t now_ms);

int ns_input(const uint8_t *packet, size_t len);
/* Read up to max_packets from a non-blocking fd and feed them; returns packets read, or -errno. */
int ns_pump(int fd, int max_packets);

void ns_timers(void);
uint32_t ns_next_timer_ms(void);

/* The events queued since ns_events_clear. A flow's TCP events are never lost: one that finds no room
 * (out of memory) waits on its flow, in order, and comes with a later call (ns_next_timer_ms is then at
 * most 10 ms). UDP and ICMP events that find no room are dropped and counted (dropped_other): the app's
 * retransmission recovers them. */
size_t ns_events(const ns_event **events, const uint8_t **arena);
void ns_events_clear(void);
/* Tests only: while frozen, the event queue behaves as full and unable to grow (as when realloc fails). */
void ns_test_freeze_events(int frozen);
/* Queued output (sans-IO mode): a buffer of [u32 length][bytes] records, valid until ns_out_clear. */
size_t ns_out_take(const uint8_t **buf);
void ns_out_clear(void);

int ns_tcp_accept(uint32_t flow);
int ns_tcp_refuse(uint32_t flow);
int ns_tcp_write(uint32_t flow, const uint8_t *data, size_t len);
int ns_tcp_read(uint32_t flow, uint8_t *buf, size_t maxlen);
int ns_tcp_ack(uint32_t flow, size_t len);
int ns_tcp_shutdown(uint32_t flow);
/* Release a flow: graceful close (FIN) unless abort (RST); a flow already gone is just freed. */
int ns_tcp_close(uint32_t flow, int abort);
size_t ns_tcp_sndbuf(uint32_t flow);
/* Bytes lwIP holds right now (received and sent data not yet released, pcbs): cheap, for memory caps. */
uint64_t ns_mem_in_use(void);
/* What ns_flush returns: the kinds of ACKs still owed (bits). NOW: send them soon (ns_flush_acks(0)).
 * HELD: a flow's first owed ACK (the end of a new connection's request), which may wait a few
 * milliseconds for the answer to carry it; ns_flush_acks(1) sends it bare when that wait ends. */
enum { NS_ACKS_NOW = 1, NS_ACKS_HELD = 2 };
/* Send what ns_tcp_write queued since the last call (ns_out_take does this first). Call once per turn of
 * the caller's loop, after its writes and shutdowns. Returns the NS_ACKS_* kinds still owed (0: none). */
int ns_flush(void);
/* Send the ACKs still owed (see above) as bare ACKs, the held ones too when held_too; call soon after
 * ns_flush returned NS_ACKS_NOW, once the turn's other sends are out (ns_out_take sends all of them).
 * Returns how many held ACKs are still owed. */
int ns_flush_acks(int held_too);

int ns_udp_send(int family, const uint8_t *src, uint16_t sport, const uint8_t *dst, uint16_t dport,
                const uint8_t *payload, size_t len);

void ns_get_stats(ns_stats *stats);

/* ---- ICMP (issue 11): echo requests become events, echo replies and unreachable errors go to the apps.
 * An echo request (ICMP type 8 / ICMPv6 type 128, code 0, valid checksum) becomes NS_EV_ICMP_ECHO with
 * src = the app, dst = the target, sport = identifier, dport = sequence number, payload in the arena.
 * Every other ICMP message is dropped and counted (dropped_icmp): never a fake reply. */
#define NS_EV_ICMP_ECHO 16

/* Unreachable codes, independent of the family (the agent protocol's UNREACH_* values). */
#define NS_UNREACH_NET 0
#define NS_UNREACH_HOST 1
#define NS_UNREACH_PORT 2
#define NS_UNREACH_PROHIBITED 3

typedef struct {
    uint64_t echo_requests, echo_replies, unreachable_sent;
} ns_icmp_stats;

/* An echo reply from src (the target) to dst (the app) with the app's identifier and sequence number. */
int ns_icmp_echo_reply(int family, const uint8_t *src, const uint8_t *dst, uint16_t ident, uint16_t seq,
                       const uint8_t *payload, size_t len);
/* A destination-unreachable error (ICMP type 3 / ICMPv6 type 1, code from `code`) from `reporter` to the
 * app, quoting an IP header app -> dst and the first 8 bytes of the original transport header: for
 * proto 17 (UDP) a = source port, b = destination port; for proto 1/58 (echo) a = identifier, b = seq. */
int ns_icmp_unreachable(int family, const uint8_t *reporter, const uint8_t *app, const uint8_t *dst,
                        int proto, uint16_t a, uint16_t b, int code);
void ns_get_icmp_stats(ns_icmp_stats *stats);

#endif /* X2SSH_NS_GLUE_H */
