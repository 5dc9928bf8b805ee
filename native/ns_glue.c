/* x2ssh netstack glue around lwIP 2.1.3. See ns_glue.h for the theory of operation. */
#define _GNU_SOURCE
#ifdef _WIN32
#define _CRT_RAND_S /* rand_s (the system RNG, no extra import library) is declared only with this */
#endif
#include "ns_glue.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _WIN32
/* Windows: the CRT's read/write stand in for unistd.h's (only ns_pump and an fd output use them, and a
 * Wintun run uses neither: it feeds ns_input and drains the output queue); the clock is
 * QueryPerformanceCounter. */
#define WIN32_LEAN_AND_MEAN
#include <io.h>
#include <windows.h>
#else
#include <sys/syscall.h>  /* getrandom by syscall: glibc got a wrapper only in 2.25 (manylinux_2_17 wheels) */
#include <time.h>
#include <unistd.h>
#endif

#include "lwip/init.h"
#include "lwip/ip.h"
#include "lwip/ip4.h"
#include "lwip/ip6.h"
#include "lwip/netif.h"
#include "lwip/pbuf.h"
#include "lwip/priv/tcp_priv.h"
#include "lwip/tcp.h"
#include "lwip/timeouts.h"

#define NS_MAX_PACKET 65535
#define NS_IDX_BITS 22
#define NS_IDX_MASK ((1u << NS_IDX_BITS) - 1)
#define NS_ORPHAN_BUCKETS 16384 /* a power of two */

/* FLOW_CLOSING: released by the consumer (graceful) while lwIP still waited for the app's ACK of our SYN-ACK.
 * The flow stays behind, invisible to the API and silent, until the handshake completes and ns_flush closes
 * its pcb (or lwIP drops the pcb: on_err frees the flow). See ns_tcp_close. */
enum { FLOW_PENDING = 1, FLOW_ACCEPTED = 2, FLOW_CLOSED = 3, FLOW_CLOSING = 4 };
enum {
    F_RX_EOF = 1,          /* app sent FIN */
    F_TX_SHUT = 2,         /* we sent FIN */
    F_READABLE_SENT = 4,   /* a READABLE event is outstanding until the rx queue empties */
    F_WANT_WRITABLE = 8,   /* a write was short: emit WRITABLE when the send buffer drains */
    F_OUTPUT_PENDING = 16, /* written since the last ns_flush: listed in G.pending_out */
    F_SHUT_DEFERRED = 32,  /* shutdown asked before the handshake completed: FIN at the next ns_flush */
    F_ACK_LISTED = 64,     /* may owe the app an ACK: listed in G.ack_owed until ns_flush_acks */
    F_CLOSE_DEFERRED = 128, /* closed gracefully with bytes unread: NS_EV_TCP_CLOSED once they are read */
};
/* ns_flow.ack: the owed-ACK state (see owe_ack). */
enum {
    A_HOLD_USED = 1, /* the flow's one held ACK was owed already: every later one is owed at once */
    A_HELD = 2,      /* the ACK listed in G.ack_owed may wait for an answer (ns_flush_acks(0) keeps it) */
};

typedef struct {
    uint8_t family;
    uint8_t src[16], dst[16]; /* src: the app; dst: its original destination */
    uint16_t sport, dport;    /* host byte order */
} ns_tuple;

typedef struct ns_flow {
    uint32_t id;
    uint8_t state, flags, in_hash, ack;
    struct tcp_pcb *pcb;
    struct pbuf *rx, *rx_tail; /* received, not yet read: a list of single pbufs linked by next */
    size_t rx_len;            /* bytes in rx (a pbuf's 16-bit tot_len would wrap past 64 KiB: unused) */
    size_t read_unacked;      /* read by the consumer, window not yet reopened */
    uint8_t *syn;             /* the held SYN while pending */
    uint16_t syn_len;
    ns_tuple key;
    struct ns_flow *hnext;
    /* Events the queue had no room for (out of memory), re-emitted by ns_events: see flow_event. */
    uint8_t lost;             /* LOST_* bits */
    int8_t lost_err;          /* the NS_CLOSED_* reason of a lost NS_EV_TCP_CLOSED */
    struct ns_flow *lost_next, *lost_prev; /* in G.lost while lost != 0 */
} ns_flow;

static struct {
    int open, lwip_ready, out_fd, manual_clock, max_flows;
    int verify_checksums;           /* see ns_set_verify_checksums */
    uint64_t now_ms;
    uint8_t ext_id;
    struct netif netif;
    struct tcp_pcb **listeners;     /* one per destination port, created on first accept */
    ns_flow **slots;                /* flow table indexed by id & NS_IDX_MASK */
    uint32_t nslots, *free_idx, nfree, gen;
    ns_flow **buckets;              /* 4-tuple hash: SYN dedupe for pending and attached flows */
    uint32_t nbuckets, hcount;
    int hash_incomplete;            /* a flow is missing from the 4-tuple hash (no memory for its table) */
    uint32_t orphans[NS_ORPHAN_BUCKETS]; /* live pcbs of released flows, by 4-tuple hash (see orphan_mark) */
    ns_flow *accepting;             /* the flow whose SYN is being fed to lwIP by ns_tcp_accept */
    uint32_t *pending_out;          /* flows written to since the last ns_flush */
    size_t npending_out, cap_pending_out;
    uint32_t *ack_owed;             /* flows that may owe the app a quick ACK (see ns_flush_acks) */
    size_t nack_owed, cap_ack_owed;
    ns_event *events;
    size_t nevents, cap_events;
    ns_flow *lost;                  /* flows with events the queue had no room for (see flow_event) */
    int events_frozen;              /* test switch: the event queue cannot grow (ns_test_freeze_events) */
    size_t frozen_cap;
    uint8_t *arena, *out;
    size_t arena_len, arena_cap, out_len, out_cap;
    ns_stats st;
    uint8_t scratch[NS_MAX_PACKET + 64];
    uint8_t rxbuf[NS_MAX_PACKET + 64];
} G;

/* ---- platform hooks used by lwIP (arch/cc.h, lwipopts.h) ---- */

void ns_platform_assert(const char *msg, int line, const char *file) {
    fprintf(stderr, "x2ssh netstack: lwIP assertion failed: %s (%s:%d)\n", msg, file, line);
    fflush(stderr);
    abort();
}

void ns_diag(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("lwip: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
}

#ifdef _WIN32
uint32_t ns_rand32(void) {
    unsigned int r = 0;
    if (rand_s(&r) != 0) {
        r = ((unsigned int)rand() << 16) ^ (unsigned int)rand(); /* RAND_MAX is 0x7fff there */
    }
    return (uint32_t)r;
}
#else
uint32_t ns_rand32(void) {
    uint32_t r = 0;
    if (syscall(SYS_getrandom, &r, sizeof r, 0x0001 /* GRND_NONBLOCK */) != (long)sizeof r) {
        r = (uint32_t)random();
    }
    return r;
}
#endif

/* libc allocations with a size header, so the bytes lwIP holds can be counted (leak tests). */
#define NS_MEM_HDR 16
void *ns_mem_malloc(size_t size) {
    uint8_t *p = malloc(size + NS_MEM_HDR);
    if (!p) return NULL;
    *(size_t *)p = size;
    G.st.mem_in_use += size;
    return p + NS_MEM_HDR;
}
void ns_mem_free(void *ptr) {
    if (!ptr) return;
    uint8_t *p = (uint8_t *)ptr - NS_MEM_HDR;
    G.st.mem_in_use -= *(size_t *)p;
    free(p);
}
void *ns_mem_calloc(size_t count, size_t size) {
    if (size && count > SIZE_MAX / size) return NULL;
    void *p = ns_mem_malloc(count * size);
    if (p) memset(p, 0, count * size);
    return p;
}

#ifdef _WIN32
u32_t sys_now(void) {
    if (G.manual_clock) return (u32_t)G.now_ms;
    /* Monotonic like CLOCK_MONOTONIC, with millisecond precision (GetTickCount64 ticks every ~15.6 ms).
     * Whole seconds and the remainder are scaled apart, so counter * 1000 cannot overflow. */
    static uint64_t freq;
    LARGE_INTEGER c;
    if (!freq) {
        LARGE_INTEGER f;
        QueryPerformanceFrequency(&f); /* never fails on Windows XP and later */
        freq = (uint64_t)f.QuadPart;
    }
    QueryPerformanceCounter(&c);
    uint64_t t = (uint64_t)c.QuadPart;
    return (u32_t)((t / freq) * 1000u + (t % freq) * 1000u / freq);
}
#else
u32_t sys_now(void) {
    if (G.manual_clock) return (u32_t)G.now_ms;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (u32_t)((uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u);
}
#endif

/* ---- small helpers ---- */

static int grow(void **buf, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t ncap = *cap ? *cap : 64;
    while (ncap < need) ncap *= 2;
    void *n = realloc(*buf, ncap * elem);
    if (!n) return -1;
    *buf = n;
    *cap = ncap;
    return 0;
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static void wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }

static uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t len) {
    while (len > 1) { sum += (uint32_t)((p[0] << 8) | p[1]); p += 2; len -= 2; }
    if (len) sum += (uint32_t)(p[0] << 8);
    return sum;
}
static uint16_t csum_fold(uint32_t sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}
/* Transport checksum over the pseudo header plus segment (checksum field included as it is). */
static uint16_t l4_csum(int family, const uint8_t *src, const uint8_t *dst, uint8_t proto,
                        const uint8_t *seg, size_t len) {
    size_t alen = family == 4 ? 4 : 16;
    uint32_t sum = csum_add(0, src, alen);
    sum = csum_add(sum, dst, alen);
    sum += proto;
    sum += (uint32_t)(len & 0xffff) + (uint32_t)(len >> 16);
    sum = csum_add(sum, seg, len);
    return csum_fold(sum);
}

/* ---- events and output ---- */

static ns_event *push_event(uint32_t type, uint32_t flow) {
    /* (the test switch is read only when the queue is full: it costs nothing per event) */
    if (G.nevents >= G.cap_events &&
        (G.events_frozen || grow((void **)&G.events, &G.cap_events, G.nevents + 1, sizeof(ns_event)))) {
        return NULL;
    }
    ns_event *e = &G.events[G.nevents++];
    memset(e, 0, sizeof *e);
    e->type = type;
    e->flow = flow;
    return e;
}

static void fill_addrs(ns_event *e, const ns_tuple *t) {
    e->family = t->family;
    memcpy(e->src, t->src, 16);
    memcpy(e->dst, t->dst, 16);
    e->sport = t->sport;
    e->dport = t->dport;
}

/* A flow's TCP events may not be lost: without its CLOSED (or its CONNECT, or EOF) the consumer would never
 * learn that the flow ended or began, and its transport, channel and id would leak while the app waits.
 * When the queue cannot grow (out of memory), the event is remembered on the flow instead: one bit per kind
 * (every kind is level-like, one of each is all the consumer needs; no allocation) and the flow joins the
 * G.lost list, which ns_events empties into the queue as soon as there is room. While a flow has events
 * waiting, its later ones wait too, so they keep their order: the bits are re-emitted as CONNECT,
 * READABLE, WRITABLE, EOF, CLOSED, the one order a flow's events can have (data only after CONNECT and
 * before CLOSED; WRITABLE before or after EOF, both are only hints). */
static const uint8_t lost_order[] = {NS_EV_TCP_CONNECT, NS_EV_TCP_READABLE, NS_EV_TCP_WRITABLE, NS_EV_TCP_EOF,
                                     NS_EV_TCP_CLOSED};
#define LOST_BIT(type) ((uint8_t)(1u << ((type) - 1)))
#define NS_LOST_RETRY_MS 10 /* how soon ns_next_timer_ms asks for another ns_events while events wait */

static void lost_unlink(ns_flow *f) {
    if (f->lost_prev) f->lost_prev->lost_next = f->lost_next; else G.lost = f->lost_next;
    if (f->lost_next) f->lost_next->lost_prev = f->lost_prev;
    f->lost_next = f->lost_prev = NULL;
    f->lost = 0;
}

static int push_flow_event(ns_flow *f, uint32_t type, int32_t err) {
    ns_event *e = push_event(type, f->id);
    if (!e) return -1;
    if (type == NS_EV_TCP_CONNECT) fill_addrs(e, &f->key);
    e->err = err;
    return 0;
}

static void flow_event(ns_flow *f, uint32_t type, int32_t err) {
    if (!f->lost && push_flow_event(f, type, err) == 0) return;
    if (!f->lost) {
        f->lost_prev = NULL;
        f->lost_next = G.lost;
        if (G.lost) G.lost->lost_prev = f;
        G.lost = f;
    }
    f->lost |= LOST_BIT(type);
    if (type == NS_EV_TCP_CLOSED) f->lost_err = (int8_t)err;
    G.st.events_deferred++;
}

/* Queue the events that found no room before (see flow_event), as far as there is room now. */
static void requeue_lost(void) {
    while (G.lost) {
        ns_flow *f = G.lost;
        for (size_t i = 0; i < sizeof lost_order; i++) {
            uint32_t type = lost_order[i];
            if (!(f->lost & LOST_BIT(type))) continue;
            if (push_flow_event(f, type, type == NS_EV_TCP_CLOSED ? f->lost_err : 0)) return;
            f->lost &= (uint8_t)~LOST_BIT(type);
        }
        lost_unlink(f);
    }
}

static void emit(const uint8_t *pkt, size_t len) {
    if (G.out_fd >= 0) {
        ssize_t n = write(G.out_fd, pkt, len);
        if (n != (ssize_t)len) { G.st.dropped_output++; return; }
    } else {
        if (grow((void **)&G.out, &G.out_cap, G.out_len + len + 4, 1)) { G.st.dropped_output++; return; }
        uint32_t l = (uint32_t)len;
        memcpy(G.out + G.out_len, &l, 4);
        memcpy(G.out + G.out_len + 4, pkt, len);
        G.out_len += len + 4;
    }
    G.st.packets_out++;
    G.st.bytes_out += len;
}

static err_t emit_pbuf(struct pbuf *p) {
    if (p->next == NULL) {
        emit(p->payload, p->len);
    } else {
        u16_t n = pbuf_copy_partial(p, G.scratch, p->tot_len, 0);
        emit(G.scratch, n);
    }
    return ERR_OK;
}

static err_t netif_out4(struct netif *n, struct pbuf *p, const ip4_addr_t *a) {
    (void)n; (void)a;
    return emit_pbuf(p);
}
static err_t netif_out6(struct netif *n, struct pbuf *p, const ip6_addr_t *a) {
    (void)n; (void)a;
    return emit_pbuf(p);
}
static err_t netif_init_cb(struct netif *n) {
    n->name[0] = 'x';
    n->name[1] = 's';
    n->output = netif_out4;
    n->output_ip6 = netif_out6;
    return ERR_OK;
}

/* ---- flow table and 4-tuple hash ---- */

static uint32_t tuple_hash(const ns_tuple *t) {
    uint32_t h = 2166136261u;
    const uint8_t *b = (const uint8_t *)t;
    for (size_t i = 0; i < sizeof *t; i++) { h ^= b[i]; h *= 16777619u; }
    return h;
}

static void hash_insert(ns_flow *f) {
    if (G.hcount + 1 > G.nbuckets) {
        uint32_t nb = G.nbuckets ? G.nbuckets * 2 : 1024;
        ns_flow **b = calloc(nb, sizeof *b);
        if (!b && !G.nbuckets) { G.hash_incomplete = 1; return; } /* (see stale_pcb_possible) */
        if (!b) goto insert; /* keep the old table: longer chains, nothing breaks */
        for (uint32_t i = 0; i < G.nbuckets; i++) {
            ns_flow *x = G.buckets[i];
            while (x) {
                ns_flow *nx = x->hnext;
                uint32_t j = tuple_hash(&x->key) & (nb - 1);
                x->hnext = b[j];
                b[j] = x;
                x = nx;
            }
        }
        free(G.buckets);
        G.buckets = b;
        G.nbuckets = nb;
    }
insert:;
    uint32_t j = tuple_hash(&f->key) & (G.nbuckets - 1);
    f->hnext = G.buckets[j];
    G.buckets[j] = f;
    f->in_hash = 1;
    G.hcount++;
}

static void hash_remove(ns_flow *f) {
    if (!f->in_hash) return;
    ns_flow **pp = &G.buckets[tuple_hash(&f->key) & (G.nbuckets - 1)];
    while (*pp && *pp != f) pp = &(*pp)->hnext;
    if (*pp) *pp = f->hnext;
    f->in_hash = 0;
    G.hcount--;
}

static ns_flow *hash_find(const ns_tuple *t) {
    if (!G.nbuckets) return NULL;
    for (ns_flow *x = G.buckets[tuple_hash(t) & (G.nbuckets - 1)]; x; x = x->hnext) {
        if (memcmp(&x->key, t, sizeof *t) == 0) return x;
    }
    return NULL;
}

/* Any flow with this id, a FLOW_CLOSING one included (for the glue's own bookkeeping). */
static ns_flow *flow_find(uint32_t id) {
    uint32_t idx = id & NS_IDX_MASK;
    if (idx >= G.nslots) return NULL;
    ns_flow *f = G.slots[idx];
    return (f && f->id == id) ? f : NULL;
}

/* The flow the API's caller may use: a FLOW_CLOSING one was released, so it is NS_ENOFLOW to them. */
static ns_flow *flow_get(uint32_t id) {
    ns_flow *f = flow_find(id);
    return (f && f->state != FLOW_CLOSING) ? f : NULL;
}

static ns_flow *flow_new(const ns_tuple *key) {
    uint32_t idx;
    if (G.nfree) {
        idx = G.free_idx[--G.nfree];
    } else {
        if (G.nslots >= NS_IDX_MASK) return NULL;
        size_t cap = G.nslots, fcap = G.nslots;
        if (grow((void **)&G.slots, &cap, G.nslots + 1, sizeof(ns_flow *))) return NULL;
        if (grow((void **)&G.free_idx, &fcap, cap, sizeof(uint32_t))) return NULL;
        /* grow() doubled the capacity: remember the spare slots as free ones */
        for (uint32_t i = (uint32_t)cap; i-- > G.nslots + 1;) {
            G.slots[i] = NULL;
            G.free_idx[G.nfree++] = i;
        }
        idx = G.nslots;
        G.nslots = (uint32_t)cap;
    }
    ns_flow *f = calloc(1, sizeof *f);
    if (!f) { G.free_idx[G.nfree++] = idx; return NULL; }
    /* Ids come back: the generation (10 bits, one counter for all slots) repeats after 1023 new flows,
     * and a freed slot is the next one used. A stale id left in G.pending_out or G.ack_owed is harmless:
     * ns_flush and ns_flush_acks look each id up again and do only what the flow holding it needs anyway
     * (an output, its deferred FIN or close, an owed ACK), flag-gated, so a second entry repeats nothing.
     * Events for a released flow precede the CONNECT of the flow reusing its id; a released TcpFlow never
     * calls in by id (netstack/stack.py). */
    G.gen = (G.gen + 1) & ((1u << (32 - NS_IDX_BITS)) - 1);
    if (G.gen == 0) G.gen = 1;
    f->id = (G.gen << NS_IDX_BITS) | idx;
    f->key = *key;
    G.slots[idx] = f;
    G.st.flows_live++;
    return f;
}

/* The receive queue. lwIP hands over chains of at most 64 KiB; pbuf_cat'ing them would wrap the head's
 * 16-bit tot_len and walk the whole queue per segment. The queue instead links single pbufs through their
 * next pointers, appends at a tail pointer and keeps its own size_t count: no pbuf's tot_len in it is ever
 * read again. Each pbuf is freed on its own (detached first), so refcounts stay exact. */
static void rx_append(ns_flow *f, struct pbuf *p) {
    struct pbuf *last = p;
    while (last->next) last = last->next; /* (the new chain only: a segment's few pbufs) */
    if (f->rx_tail) f->rx_tail->next = p; else f->rx = p;
    f->rx_tail = last;
    f->rx_len += p->tot_len;
}

/* Drop the first pbuf of the queue. */
static void rx_pop(ns_flow *f) {
    struct pbuf *q = f->rx;
    f->rx = q->next;
    if (!f->rx) f->rx_tail = NULL;
    q->next = NULL;
    pbuf_free(q);
}

static void rx_free(ns_flow *f) {
    while (f->rx) rx_pop(f);
    f->rx_len = 0;
}

/* Pcbs of released flows ("orphans": detached, finishing their close in lwIP) are counted by 4-tuple hash:
 * the pcb's ext arg holds its bucket + 1, and on_pcb_destroyed (lwIP's destroy hook, called as tcp_free
 * frees any pcb) counts it out. An empty bucket proves that no orphan has the 4-tuple (see
 * stale_pcb_possible). */
static void orphan_mark(struct tcp_pcb *pcb, const ns_tuple *key) {
    uint32_t b = tuple_hash(key) & (NS_ORPHAN_BUCKETS - 1);
    G.orphans[b]++;
    tcp_ext_arg_set(pcb, G.ext_id, (void *)(uintptr_t)(b + 1));
}

static void on_pcb_destroyed(u8_t id, void *data) {
    (void)id;
    if (data) G.orphans[(uintptr_t)data - 1]--;
}

/* Forget the pcb: no lwIP callback will reach this flow again (it is an orphan until lwIP frees it). */
static void detach_pcb(ns_flow *f) {
    if (f->pcb) {
        orphan_mark(f->pcb, &f->key);
        tcp_arg(f->pcb, NULL);
        tcp_recv(f->pcb, NULL);
        tcp_sent(f->pcb, NULL);
        tcp_err(f->pcb, NULL);
        f->pcb = NULL;
    }
}

static void flow_free(ns_flow *f) {
    if (f->lost) lost_unlink(f);
    hash_remove(f);
    rx_free(f);
    free(f->syn);
    if (f->state == FLOW_PENDING) G.st.flows_pending--;
    G.slots[f->id & NS_IDX_MASK] = NULL;
    G.free_idx[G.nfree++] = f->id & NS_IDX_MASK;
    G.st.flows_live--;
    free(f);
}

/* List a flow that may owe the app an ACK (lwIP's TF_ACK_DELAY says whether it still does). Returns 0
 * when there is no memory to remember it: the ACK is then marked to go with the pcb's next output.
 *
 * A flow's first owed ACK is held (A_HELD): it is usually the end of a new connection's request, whose
 * answer carries the ACK for free a few milliseconds later; a bare ACK would cost a TUN write and the app
 * kernel's processing of it (about one packet in four of a short connection). The caller bounds the wait
 * (ns_flush says that held ACKs are owed; ns_flush_acks(1) sends them). Only the first: an app that keeps
 * writing with Nagle on, and gets no answer, must never wait for our ACK more than once. */
static int owe_ack(ns_flow *f) {
    if (f->flags & F_ACK_LISTED) return 1;
    if (grow((void **)&G.ack_owed, &G.cap_ack_owed, G.nack_owed + 1, sizeof *G.ack_owed) != 0) {
        if (f->pcb) tcp_ack_now(f->pcb);
        return 0;
    }
    f->flags |= F_ACK_LISTED;
    f->ack = (f->ack & A_HOLD_USED) ? A_HOLD_USED : (A_HOLD_USED | A_HELD);
    G.ack_owed[G.nack_owed++] = f->id;
    return 1;
}

/* ---- lwIP callbacks: record, never call out ---- */

static err_t on_recv(void *arg, struct tcp_pcb *pcb, struct pbuf *p, err_t err) {
    ns_flow *f = arg;
    (void)err;
    if (!f || f->state == FLOW_CLOSING) { /* released: bytes are dropped unread, as ns_tcp_close does */
        if (p) { tcp_recved(pcb, p->tot_len); pbuf_free(p); }
        return ERR_OK;
    }
    if (!p) {
        if (!(f->flags & F_RX_EOF)) {
            f->flags |= F_RX_EOF;
            flow_event(f, NS_EV_TCP_EOF, 0);
        }
        return ERR_OK;
    }
    /* Quick ACK: PSH ends the app's write, and an app with Nagle on now waits for our ACK before it
     * sends its next small segment. lwIP would hold the ACK for its 250 ms timer; the link is local, so
     * the ACK is owed at once, but sent by ns_flush_acks: after the consumer had the bytes and after
     * the caller's other sends of this turn (an answer written meanwhile carries it, for free). A flow's
     * first one may wait a little longer for the answer (see owe_ack). */
    if (p->flags & PBUF_FLAG_PUSH) owe_ack(f); /* (short of memory: tcp_input's output sends it now) */
    rx_append(f, p);
    if (!(f->flags & F_READABLE_SENT)) {
        f->flags |= F_READABLE_SENT;
        flow_event(f, NS_EV_TCP_READABLE, 0);
    }
    return ERR_OK;
}

/* tcp_sndbuf() clamps to 16 bits; with window scaling the real free space is snd_buf. */
static size_t sndbuf_free(const struct tcp_pcb *pcb) { return pcb->snd_buf; }

static int send_room(const struct tcp_pcb *pcb) {
    return sndbuf_free(pcb) >= TCP_SND_BUF / 4 && tcp_sndqueuelen(pcb) < TCP_SND_QUEUELEN / 2;
}

static err_t on_sent(void *arg, struct tcp_pcb *pcb, u16_t len) {
    ns_flow *f = arg;
    (void)len;
    if (f && f->state != FLOW_CLOSING && (f->flags & F_WANT_WRITABLE) && send_room(pcb)) {
        f->flags &= (uint8_t)~F_WANT_WRITABLE;
        flow_event(f, NS_EV_TCP_WRITABLE, 0);
    }
    return ERR_OK;
}

static void on_err(void *arg, err_t err) {
    ns_flow *f = arg;
    if (!f) return;
    f->pcb = NULL; /* already freed by lwIP */
    if (f->state == FLOW_CLOSING) { /* released: nobody to tell, nothing left to close */
        flow_free(f);
        return;
    }
    hash_remove(f);
    f->state = FLOW_CLOSED;
    if (err == ERR_CLSD && f->rx) {
        /* A graceful close (the app's ACK of our FIN, after its own FIN) while bytes still wait for the
         * consumer (its reading paused): they are the app's, and its EOF comes after them. The flow keeps
         * them without a pcb; ns_tcp_read reports the close once they are read. A reset drops them. */
        f->flags |= F_CLOSE_DEFERRED;
        return;
    }
    rx_free(f);
    flow_event(f, NS_EV_TCP_CLOSED,
               err == ERR_RST ? NS_CLOSED_RESET
               : err == ERR_ABRT ? NS_CLOSED_TIMEOUT
               : err == ERR_CLSD ? NS_CLOSED_NORMAL : NS_CLOSED_ERROR);
}

static int want_flush(ns_flow *f);

/* lwIP calls this as the app's ACK completes the handshake (SYN_RCVD -> ESTABLISHED). The flow was attached
 * at SYN time (on_passive_open); a shutdown or close that waited for this moment happens at the next ns_flush
 * (not here: lwIP is still processing the segment, and sets the congestion window only after this call). */
static err_t on_accept(void *arg, struct tcp_pcb *newpcb, err_t err) {
    ns_flow *f = arg;
    (void)err;
    if (!f || f->pcb != newpcb) return ERR_OK;
    if (f->state == FLOW_CLOSING) {
        /* No memory to remember the close: refusing makes lwIP abort the pcb (a RST, and on_err frees the
         * flow) rather than leave it open with nobody to close it. */
        return want_flush(f) ? ERR_OK : ERR_MEM;
    }
    if (f->flags & F_SHUT_DEFERRED) want_flush(f);
    return ERR_OK;
}

static const struct tcp_ext_arg_callbacks ext_callbacks;

static err_t on_passive_open(u8_t id, struct tcp_pcb_listen *lpcb, struct tcp_pcb *npcb) {
    (void)id; (void)lpcb;
    ns_flow *f = G.accepting;
    if (!f || f->pcb) return ERR_ABRT; /* a SYN we did not hand over: never accept it */
    f->pcb = npcb;
    tcp_arg(npcb, f);
    tcp_recv(npcb, on_recv);
    tcp_sent(npcb, on_sent);
    tcp_err(npcb, on_err);
    tcp_nagle_disable(npcb);
    tcp_ext_arg_set_callbacks(npcb, G.ext_id, &ext_callbacks);
    return ERR_OK;
}

/* On listeners (passive_open) and on every accepted pcb (destroy: see orphan_mark). */
static const struct tcp_ext_arg_callbacks ext_callbacks = {on_pcb_destroyed, on_passive_open};

static struct tcp_pcb *listener_for(uint16_t port) {
    if (G.listeners[port]) return G.listeners[port];
    struct tcp_pcb *pcb = tcp_new_ip_type(IPADDR_TYPE_ANY);
    if (!pcb) return NULL;
    if (tcp_bind(pcb, IP_ANY_TYPE, port) != ERR_OK) { tcp_abort(pcb); return NULL; }
    tcp_ext_arg_set_callbacks(pcb, G.ext_id, &ext_callbacks);
    err_t err;
    struct tcp_pcb *l = tcp_listen_with_backlog_and_err(pcb, 255, &err);
    if (!l) { tcp_abort(pcb); return NULL; }
    tcp_arg(l, NULL);
    tcp_accept(l, on_accept);
    G.listeners[port] = l;
    G.st.listeners++;
    return l;
}

/* ---- input path ---- */

typedef struct {
    int family;
    const uint8_t *src, *dst;
    uint8_t proto;
    const uint8_t *l4;
    size_t l4len, total;
} ns_ip;

/* Validate the IP header; 0 on success. Fragments, options we cannot follow and lies about lengths are
 * rejected here so lwIP only ever sees well-formed TCP. */
static int parse_ip(const uint8_t *pkt, size_t len, ns_ip *ip) {
    if (len < 1) return -1;
    int v = pkt[0] >> 4;
    if (v == 4) {
        if (len < 20) return -1;
        size_t ihl = (size_t)(pkt[0] & 0x0f) * 4;
        size_t tot = rd16(pkt + 2);
        if (ihl < 20 || tot < ihl || tot > len) return -1;
        if (csum_fold(csum_add(0, pkt, ihl)) != 0) return -2;
        if ((rd16(pkt + 6) & 0x3fff) != 0) return -3; /* MF or offset: a fragment */
        ip->family = 4;
        ip->src = pkt + 12;
        ip->dst = pkt + 16;
        ip->proto = pkt[9];
        ip->l4 = pkt + ihl;
        ip->l4len = tot - ihl;
        ip->total = tot;
        return 0;
    }
    if (v == 6) {
        if (len < 40) return -1;
        size_t plen = rd16(pkt + 4);
        if (plen + 40 > len) return -1;
        ip->family = 6;
        ip->src = pkt + 8;
        ip->dst = pkt + 24;
        ip->proto = pkt[6];
        ip->l4 = pkt + 40;
        ip->l4len = plen;
        ip->total = plen + 40;
        if (ip->proto == 44) return -3; /* fragment header */
        return 0;
    }
    return -1;
}

static int addr_unusable(const ns_ip *ip) {
    if (ip->family == 4) {
        uint8_t d0 = ip->dst[0];
        /* multicast, broadcast, "this network" */
        return d0 >= 224 || d0 == 0 || (ip->src[0] >= 224);
    }
    static const uint8_t zero[16];
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    /* multicast, unspecified, and IPv4-mapped addresses (never valid on the wire, RFC 4291 2.5.5.2) */
    return ip->dst[0] == 0xff || ip->src[0] == 0xff || memcmp(ip->dst, zero, 16) == 0 ||
           memcmp(ip->dst, mapped, 12) == 0 || memcmp(ip->src, mapped, 12) == 0;
}

static void tuple_from(const ns_ip *ip, uint16_t sport, uint16_t dport, ns_tuple *t) {
    memset(t, 0, sizeof *t);
    t->family = (uint8_t)ip->family;
    size_t alen = ip->family == 4 ? 4 : 16;
    memcpy(t->src, ip->src, alen);
    memcpy(t->dst, ip->dst, alen);
    t->sport = sport;
    t->dport = dport;
}

/* Hand a TCP packet to lwIP as if it were addressed to us. */
static void lwip_feed(const uint8_t *pkt, const ns_ip *ip) {
    struct pbuf *p = pbuf_alloc(PBUF_RAW, (u16_t)ip->total, PBUF_RAM);
    if (!p) { G.st.dropped_other++; return; }
    memcpy(p->payload, pkt, ip->total);
    if (ip->family == 4) {
        ip4_addr_t a;
        memcpy(&a.addr, ip->dst, 4);
        ip_addr_copy_from_ip4(G.netif.ip_addr, a);
    } else {
        memcpy(ip_2_ip6(&G.netif.ip6_addr[0])->addr, ip->dst, 16);
    }
    G.netif.input(p, &G.netif);
}

/* A RST|ACK answering a SYN (or any segment without a connection) for a refused flow. */
static void send_rst_for(const uint8_t *pkt, const ns_ip *ip) {
    const uint8_t *th = ip->l4;
    size_t thl = (size_t)(th[12] >> 4) * 4;
    uint32_t seq = ((uint32_t)th[4] << 24) | ((uint32_t)th[5] << 16) | ((uint32_t)th[6] << 8) | th[7];
    uint8_t flags = th[13];
    uint32_t seglen = (uint32_t)(ip->l4len - thl) + ((flags & 0x02) ? 1 : 0) + ((flags & 0x01) ? 1 : 0);
    uint32_t ack = seq + seglen;
    (void)pkt;
    uint8_t *o = G.scratch;
    size_t hl = ip->family == 4 ? 20 : 40, alen = ip->family == 4 ? 4 : 16;
    memset(o, 0, hl + 20);
    uint8_t *t = o + hl;
    if (ip->family == 4) {
        o[0] = 0x45;
        wr16(o + 2, (uint16_t)(hl + 20));
        o[8] = 64;
        o[9] = 6;
        memcpy(o + 12, ip->dst, 4);
        memcpy(o + 16, ip->src, 4);
        wr16(o + 10, csum_fold(csum_add(0, o, 20)));
    } else {
        o[0] = 0x60;
        wr16(o + 4, 20);
        o[6] = 6;
        o[7] = 64;
        memcpy(o + 8, ip->dst, 16);
        memcpy(o + 24, ip->src, 16);
    }
    memcpy(t, th + 2, 2);
    memcpy(t + 2, th, 2);
    t[8] = (uint8_t)(ack >> 24); t[9] = (uint8_t)(ack >> 16); t[10] = (uint8_t)(ack >> 8); t[11] = (uint8_t)ack;
    t[12] = 5 << 4;
    t[13] = 0x14; /* RST|ACK */
    wr16(t + 16, l4_csum(ip->family, o + (ip->family == 4 ? 12 : 8), o + (ip->family == 4 ? 16 : 24), 6, t, 20));
    (void)alen;
    emit(o, hl + 20);
}

/* TIME_WAIT guards against old duplicates of a connection on a real network. Our peer is the local
 * kernel over a TUN: nothing lingers in flight, and lwIP finds a pcb by walking its lists, so thousands
 * of TIME_WAIT pcbs (short connections at a few thousand per second) would cost every SYN a long walk.
 * Our last ACK has been sent by the time a pcb enters TIME_WAIT (tcp_input outputs before returning): free
 * the pcbs at once. If that ACK were lost, the app's retransmitted FIN draws a RST, which ends its
 * LAST_ACK just the same.
 *
 * That includes the pcb of a flow the consumer has not released yet (we sent FIN, then the app's FIN came):
 * lwIP's timer frees a TIME_WAIT pcb after 2 * TCP_MSL without calling its err callback, so a flow still
 * pointing at it would later touch freed memory and free it again in ns_tcp_close (the "double free in
 * tcache" seen under 1,000 concurrent flows, where sshd's CLOSE took longer than TIME_WAIT). The flow keeps
 * what it received for the consumer to read and waits for its release, without a pcb: the connection is
 * complete both ways. It leaves the 4-tuple hash, so the app may connect again from the same port. */
static void reap_time_wait(void) {
    struct tcp_pcb *p = tcp_tw_pcbs;
    while (p) {
        struct tcp_pcb *next = p->next;
        ns_flow *f = p->callback_arg;
        if (f) {
            detach_pcb(f);
            if (f->state == FLOW_CLOSING) flow_free(f); /* (cannot happen: its FIN leaves in close_released) */
            else hash_remove(f);
        }
        tcp_abort(p); /* a TIME_WAIT pcb is freed without a RST */
        p = next;
    }
}

static void input_tcp_segment(const uint8_t *pkt, const ns_ip *ip);

static void input_tcp(const uint8_t *pkt, const ns_ip *ip) {
    input_tcp_segment(pkt, ip);
    if (tcp_tw_pcbs) reap_time_wait();
}

static void input_tcp_segment(const uint8_t *pkt, const ns_ip *ip) {
    const uint8_t *th = ip->l4;
    if (ip->l4len < 20) { G.st.dropped_malformed++; return; }
    size_t thl = (size_t)(th[12] >> 4) * 4;
    if (thl < 20 || thl > ip->l4len) { G.st.dropped_malformed++; return; }
    uint8_t flags = th[13];
    if (rd16(th) == 0 || rd16(th + 2) == 0) { G.st.dropped_malformed++; return; }
    if ((flags & 0x16) != 0x02) { lwip_feed(pkt, ip); return; } /* not a bare SYN: lwIP decides */
    if (G.verify_checksums && l4_csum(ip->family, ip->src, ip->dst, 6, th, ip->l4len) != 0) {
        G.st.dropped_checksum++;
        return;
    }
    ns_tuple key;
    tuple_from(ip, rd16(th), rd16(th + 2), &key);
    ns_flow *f = hash_find(&key);
    if (f) {
        if (f->state != FLOW_PENDING) lwip_feed(pkt, ip); /* a retransmitted SYN: lwIP answers again */
        return;                                           /* still deciding: the app will retry */
    }
    if (G.st.flows_live >= (uint64_t)G.max_flows || !(f = flow_new(&key))) {
        G.st.tcp_over_limit++;
        send_rst_for(pkt, ip);
        return;
    }
    f->syn = malloc(ip->total);
    if (!f->syn) { flow_free(f); send_rst_for(pkt, ip); return; }
    memcpy(f->syn, pkt, ip->total);
    f->syn_len = (uint16_t)ip->total;
    f->state = FLOW_PENDING;
    G.st.flows_pending++;
    hash_insert(f);
    flow_event(f, NS_EV_TCP_CONNECT, 0);
}

static void input_udp(const ns_ip *ip) {
    const uint8_t *u = ip->l4;
    if (ip->l4len < 8) { G.st.dropped_malformed++; return; }
    size_t ulen = rd16(u + 4);
    if (ulen < 8 || ulen > ip->l4len) { G.st.dropped_malformed++; return; }
    uint16_t ck = rd16(u + 6);
    if (ip->family == 6 && ck == 0) { G.st.dropped_checksum++; return; } /* mandatory in IPv6 */
    if (ck != 0 && G.verify_checksums && l4_csum(ip->family, ip->src, ip->dst, 17, u, ulen) != 0) {
        G.st.dropped_checksum++;
        return;
    }
    size_t plen = ulen - 8;
    if (grow((void **)&G.arena, &G.arena_cap, G.arena_len + plen + 1, 1)) { G.st.dropped_other++; return; }
    ns_tuple t;
    tuple_from(ip, rd16(u), rd16(u + 2), &t);
    ns_event *e = push_event(NS_EV_UDP, 0);
    if (!e) { G.st.dropped_other++; return; }
    fill_addrs(e, &t);
    e->off = (uint32_t)G.arena_len;
    e->len = (uint32_t)plen;
    memcpy(G.arena + G.arena_len, u + 8, plen);
    G.arena_len += plen;
    G.st.udp_in++;
}

static void input_icmp(const ns_ip *ip);

int ns_input(const uint8_t *pkt, size_t len) {
    if (!G.open) return NS_ESTATE;
    G.st.packets_in++;
    G.st.bytes_in += len;
    ns_ip ip;
    int r = parse_ip(pkt, len, &ip);
    if (r == -2) { G.st.dropped_checksum++; return 0; }
    if (r == -3) { G.st.dropped_fragment++; return 0; }
    if (r < 0) { G.st.dropped_malformed++; return 0; }
    if (addr_unusable(&ip)) { G.st.dropped_other++; return 0; }
    switch (ip.proto) {
    case 6: input_tcp(pkt, &ip); break;
    case 17: input_udp(&ip); break;
    case 1: case 58: input_icmp(&ip); break; /* echo requests go to the agent; the rest is dropped */
    default: G.st.dropped_other++; break;
    }
    return 0;
}

int ns_pump(int fd, int max_packets) {
    int n = 0;
    while (n < max_packets) {
        ssize_t r = read(fd, G.rxbuf, sizeof G.rxbuf);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            return n ? n : -errno;
        }
        if (r == 0) break;
        ns_input(G.rxbuf, (size_t)r);
        n++;
    }
    return n;
}

/* ---- timers ---- */

void ns_timers(void) {
    if (!G.open) return;
    if (tcp_tw_pcbs) reap_time_wait(); /* none should be left by input; lwIP's timer must never free one */
    sys_check_timeouts();
}

uint32_t ns_next_timer_ms(void) {
    uint32_t ms = sys_timeouts_sleeptime();
    /* Events waiting for room in the queue (see flow_event): the caller's next ns_events retries. */
    return (G.lost && ms > NS_LOST_RETRY_MS) ? NS_LOST_RETRY_MS : ms;
}

void ns_test_freeze_events(int frozen) {
    if (frozen && !G.events_frozen) {
        G.frozen_cap = G.cap_events;
        G.cap_events = G.nevents; /* full: the next event finds no room, as if realloc had failed */
        G.events_frozen = 1;
    } else if (!frozen && G.events_frozen) {
        G.cap_events = G.frozen_cap;
        G.events_frozen = 0;
    }
}

/* ---- event and output queues ---- */

size_t ns_events(const ns_event **events, const uint8_t **arena) {
    if (G.lost) requeue_lost();
    *events = G.events;
    *arena = G.arena;
    return G.nevents;
}

void ns_events_clear(void) {
    G.nevents = 0;
    G.arena_len = 0;
}

size_t ns_out_take(const uint8_t **buf) {
    ns_flush();
    ns_flush_acks(1);
    *buf = G.out;
    return G.out_len;
}

void ns_out_clear(void) { G.out_len = 0; }

/* ---- TCP operations ---- */

/* A pcb left behind by a released flow (TIME_WAIT, LAST_ACK...) with this 4-tuple would swallow a new
 * SYN: free it first. */
static void drop_stale_pcb(const ns_tuple *k) {
    struct tcp_pcb *lists[2] = {tcp_tw_pcbs, tcp_active_pcbs};
    for (int i = 0; i < 2; i++) {
        for (struct tcp_pcb *p = lists[i]; p; p = p->next) {
            if (p->callback_arg == NULL && p->remote_port == k->sport && p->local_port == k->dport &&
                IP_GET_TYPE(&p->remote_ip) == (k->family == 4 ? IPADDR_TYPE_V4 : IPADDR_TYPE_V6)) {
                const void *ra = k->family == 4 ? (const void *)ip_2_ip4(&p->remote_ip)
                                                : (const void *)ip_2_ip6(&p->remote_ip);
                const void *la = k->family == 4 ? (const void *)ip_2_ip4(&p->local_ip)
                                                : (const void *)ip_2_ip6(&p->local_ip);
                size_t alen = k->family == 4 ? 4 : 16;
                if (memcmp(ra, k->src, alen) == 0 && memcmp(la, k->dst, alen) == 0) {
                    tcp_abort(p);
                    return;
                }
            }
        }
    }
}

/* Whether lwIP may hold a pcb with this 4-tuple other than the one of the flow being accepted. The pcbs in
 * lwIP's lists are the ones of flows (each in the 4-tuple hash, where a SYN for a new flow found none),
 * orphans (counted by hash bucket: see orphan_mark) and TIME_WAIT pcbs (reaped after each input, so
 * rarely any). */
static int stale_pcb_possible(const ns_tuple *k) {
    return tcp_tw_pcbs != NULL || G.hash_incomplete || G.orphans[tuple_hash(k) & (NS_ORPHAN_BUCKETS - 1)];
}

/* Feed a new flow's SYN to lwIP. tcp_input looks for the segment's pcb by walking every active pcb before
 * it tries the listeners: with thousands of live flows that walk was most of an accept's cost, and it can
 * find nothing when stale_pcb_possible says so. The list is then set aside while lwIP takes the SYN (it
 * only registers the new pcb at the head; short of memory, tcp_alloc finds no pcb to kill and the accept
 * fails with a RST, as it would anyway) and put back behind the new pcb. */
static void feed_new_syn(ns_flow *f, const ns_ip *ip) {
    if (stale_pcb_possible(&f->key)) {
        drop_stale_pcb(&f->key);
        lwip_feed(f->syn, ip);
        return;
    }
    struct tcp_pcb *aside = tcp_active_pcbs;
    tcp_active_pcbs = NULL;
    lwip_feed(f->syn, ip);
    struct tcp_pcb **tail = &tcp_active_pcbs;
    while (*tail) tail = &(*tail)->next; /* (the new pcb, if any) */
    *tail = aside;
    G.st.syn_fast_path++;
}

int ns_tcp_accept(uint32_t id) {
    ns_flow *f = flow_get(id);
    if (!f) return NS_ENOFLOW;
    if (f->state != FLOW_PENDING) return NS_ESTATE;
    ns_ip ip;
    parse_ip(f->syn, f->syn_len, &ip);
    f->state = FLOW_ACCEPTED;
    G.st.flows_pending--;
    if (!listener_for(f->key.dport)) {
        send_rst_for(f->syn, &ip);
        goto fail;
    }
    G.accepting = f;
    feed_new_syn(f, &ip);
    G.accepting = NULL;
    if (!f->pcb) { /* lwIP could not take it (out of memory): the app gets a RST, not a hang */
        send_rst_for(f->syn, &ip);
        goto fail;
    }
    free(f->syn);
    f->syn = NULL;
    return NS_OK;
fail:
    free(f->syn);
    f->syn = NULL;
    f->state = FLOW_CLOSED;
    hash_remove(f);
    flow_event(f, NS_EV_TCP_CLOSED, NS_CLOSED_ERROR);
    return NS_EMEM;
}

int ns_tcp_refuse(uint32_t id) {
    ns_flow *f = flow_get(id);
    if (!f) return NS_ENOFLOW;
    if (f->state != FLOW_PENDING) return NS_ESTATE;
    ns_ip ip;
    parse_ip(f->syn, f->syn_len, &ip);
    send_rst_for(f->syn, &ip);
    G.st.tcp_refused++;
    flow_free(f);
    return NS_OK;
}

int ns_tcp_write(uint32_t id, const uint8_t *data, size_t len) {
    ns_flow *f = flow_get(id);
    if (!f) return NS_ENOFLOW;
    if (f->state != FLOW_ACCEPTED || !f->pcb) return NS_ECLOSED;
    if (f->flags & F_TX_SHUT) return NS_ESTATE;
    size_t done = 0;
    while (done < len) {
        size_t room = sndbuf_free(f->pcb);
        if (room == 0 || tcp_sndqueuelen(f->pcb) >= TCP_SND_QUEUELEN - 4) break;
        size_t chunk = len - done;
        if (chunk > room) chunk = room;
        if (chunk > 0xffff) chunk = 0xffff;
        u8_t more = (done + chunk < len) ? TCP_WRITE_FLAG_MORE : 0;
        if (tcp_write(f->pcb, data + done, (u16_t)chunk, TCP_WRITE_FLAG_COPY | more) != ERR_OK) break;
        done += chunk;
    }
    /* Output waits for ns_flush (the end of the caller's turn): writes and a FIN from the same turn
     * leave as one segment instead of one per call. */
    if (done && !(f->flags & F_OUTPUT_PENDING) &&
        !grow((void **)&G.pending_out, &G.cap_pending_out, G.npending_out + 1, sizeof *G.pending_out)) {
        f->flags |= F_OUTPUT_PENDING;
        G.pending_out[G.npending_out++] = f->id;
    } else if (done && !(f->flags & F_OUTPUT_PENDING)) {
        tcp_output(f->pcb); /* no room to remember it: send now */
    }
    if (done < len) f->flags |= F_WANT_WRITABLE;
    return (int)(done > 0x7fffffff ? 0x7fffffff : done);
}

int ns_tcp_read(uint32_t id, uint8_t *buf, size_t maxlen) {
    ns_flow *f = flow_get(id);
    if (!f) return NS_ENOFLOW;
    if (maxlen > 0x7fffffff) maxlen = 0x7fffffff;
    size_t n = 0;
    while (f->rx && n < maxlen) {
        struct pbuf *q = f->rx;
        size_t take = maxlen - n < q->len ? maxlen - n : q->len;
        memcpy(buf + n, q->payload, take);
        n += take;
        if (take == q->len) rx_pop(f);
        else pbuf_remove_header(q, take); /* (take < len <= 0xffff) */
    }
    f->rx_len -= n;
    f->read_unacked += n;
    if (!f->rx) {
        f->flags &= (uint8_t)~F_READABLE_SENT;
        if (f->flags & F_CLOSE_DEFERRED) { /* the last bytes of a closed connection: now the close */
            f->flags &= (uint8_t)~F_CLOSE_DEFERRED;
            flow_event(f, NS_EV_TCP_CLOSED, NS_CLOSED_NORMAL);
        }
    }
    return (int)n;
}

int ns_tcp_ack(uint32_t id, size_t len) {
    ns_flow *f = flow_get(id);
    if (!f) return NS_ENOFLOW;
    if (len > f->read_unacked) len = f->read_unacked;
    f->read_unacked -= len;
    if (!f->pcb) return NS_OK;
    while (len) {
        u16_t chunk = len > 0xffff ? 0xffff : (u16_t)len;
        tcp_recved(f->pcb, chunk);
        len -= chunk;
    }
    /* The consumer has taken the bytes: an ACK lwIP still holds for its delayed-ACK timer is owed now
     * (ns_flush_acks sends it). Only when one is owed, so a bulk upload never draws duplicate ACKs. */
    if ((f->pcb->flags & TF_ACK_DELAY) && !owe_ack(f)) tcp_output(f->pcb);
    return NS_OK;
}

int ns_tcp_shutdown(uint32_t id) {
    ns_flow *f = flow_get(id);
    if (!f) return NS_ENOFLOW;
    if (f->state != FLOW_ACCEPTED || !f->pcb) return NS_ECLOSED;
    if (f->flags & F_TX_SHUT) return NS_OK;
    if (f->pcb->state == SYN_RCVD) {
        /* lwIP would go from SYN_RCVD straight to FIN_WAIT_1 and skip what ESTABLISHED sets up: its
         * congestion window stays at one byte, and the queued bytes and the FIN never leave. The FIN waits
         * for the app's ACK of our SYN-ACK instead (on_accept, then ns_flush). */
        f->flags |= F_TX_SHUT | F_SHUT_DEFERRED;
        return NS_OK;
    }
    if (tcp_shutdown(f->pcb, 0, 1) != ERR_OK) return NS_EMEM;
    f->flags |= F_TX_SHUT;
    return NS_OK;
}

int ns_tcp_close(uint32_t id, int abort_it) {
    ns_flow *f = flow_get(id);
    if (!f) return NS_ENOFLOW;
    if (f->state == FLOW_PENDING) return ns_tcp_refuse(id);
    struct tcp_pcb *pcb = f->pcb;
    if (pcb) {
        /* Whatever was received but not passed on is dropped with the flow; reopen the window for it so
         * tcp_close does not turn a graceful close into a RST. */
        size_t pending = f->read_unacked + f->rx_len;
        rx_free(f);
        f->read_unacked = 0;
        if (!abort_it && pcb->state == SYN_RCVD) {
            /* tcp_close here would jump to FIN_WAIT_1 with a one-byte congestion window (as tcp_shutdown
             * would, see ns_tcp_shutdown): the queued bytes and the FIN would never leave. The flow stays,
             * released and silent (FLOW_CLOSING), until the app's ACK (on_accept, then ns_flush closes the
             * pcb and frees it). Nothing was received yet: lwIP delivers data only after the handshake. */
            f->state = FLOW_CLOSING; /* still in the 4-tuple hash: a retransmitted SYN reaches its pcb */
            f->flags &= (uint8_t)~(F_READABLE_SENT | F_WANT_WRITABLE | F_SHUT_DEFERRED);
            return NS_OK;
        }
        detach_pcb(f);
        if (abort_it) {
            tcp_abort(pcb);
        } else {
            while (pending) {
                u16_t chunk = pending > 0xffff ? 0xffff : (u16_t)pending;
                tcp_recved(pcb, chunk);
                pending -= chunk;
            }
            if (pcb->state == TIME_WAIT || tcp_close(pcb) != ERR_OK) tcp_abort(pcb); /* see reap_time_wait */
        }
    }
    flow_free(f);
    return NS_OK;
}

size_t ns_tcp_sndbuf(uint32_t id) {
    ns_flow *f = flow_get(id);
    return (f && f->pcb) ? sndbuf_free(f->pcb) : 0;
}

uint64_t ns_mem_in_use(void) { return G.st.mem_in_use; }

/* List the flow for the next ns_flush; 0 when there is no memory to remember it. */
static int want_flush(ns_flow *f) {
    if (f->flags & F_OUTPUT_PENDING) return 1;
    if (grow((void **)&G.pending_out, &G.cap_pending_out, G.npending_out + 1, sizeof *G.pending_out) != 0) {
        return 0;
    }
    f->flags |= F_OUTPUT_PENDING;
    G.pending_out[G.npending_out++] = f->id;
    return 1;
}

/* The deferred graceful close of a released flow, now that the handshake is complete (see ns_tcp_close). */
static void close_released(ns_flow *f) {
    struct tcp_pcb *pcb = f->pcb;
    detach_pcb(f);
    if (tcp_close(pcb) != ERR_OK) tcp_abort(pcb); /* out of memory for the FIN: a RST, never a hang */
    flow_free(f);
}

/* Whether the listed flow still owes its app an ACK (one sent with data since cleared lwIP's flag). */
static int still_owes(const ns_flow *f) {
    return f->state == FLOW_ACCEPTED && f->pcb && (f->pcb->flags & TF_ACK_DELAY);
}

/* Keep the flows that still owe an ACK; return which kinds are owed (NS_ACKS_NOW, NS_ACKS_HELD). */
static int acks_still_owed(void) {
    size_t kept = 0;
    int kinds = 0;
    for (size_t i = 0; i < G.nack_owed; i++) {
        ns_flow *f = flow_find(G.ack_owed[i]);
        if (!f) continue;
        if (still_owes(f)) {
            G.ack_owed[kept++] = f->id;
            kinds |= (f->ack & A_HELD) ? NS_ACKS_HELD : NS_ACKS_NOW;
        } else {
            f->flags &= (uint8_t)~F_ACK_LISTED;
            f->ack &= (uint8_t)~A_HELD;
        }
    }
    G.nack_owed = kept;
    return kinds;
}

int ns_flush_acks(int held_too) {
    size_t kept = 0;
    for (size_t i = 0; i < G.nack_owed; i++) {
        ns_flow *f = flow_find(G.ack_owed[i]);
        if (!f) continue;
        if (!held_too && (f->ack & A_HELD) && still_owes(f)) {
            G.ack_owed[kept++] = f->id; /* (a stale id repeats nothing: see flow_new) */
            continue;
        }
        f->flags &= (uint8_t)~F_ACK_LISTED;
        f->ack &= (uint8_t)~A_HELD;
        if (still_owes(f)) {
            tcp_ack_now(f->pcb);
            tcp_output(f->pcb);
        }
    }
    G.nack_owed = kept;
    return (int)kept;
}

int ns_flush(void) {
    for (size_t i = 0; i < G.npending_out; i++) {
        ns_flow *f = flow_find(G.pending_out[i]);
        if (!f) continue;
        f->flags &= (uint8_t)~F_OUTPUT_PENDING;
        if (!f->pcb) continue;
        if (f->state == FLOW_CLOSING && f->pcb->state != SYN_RCVD) {
            close_released(f);
        } else if ((f->flags & F_SHUT_DEFERRED) && f->pcb->state != SYN_RCVD) {
            f->flags &= (uint8_t)~F_SHUT_DEFERRED;
            tcp_shutdown(f->pcb, 0, 1); /* sends (or, short of memory, lwIP's timer retries the FIN) */
        } else {
            tcp_output(f->pcb);
        }
    }
    G.npending_out = 0;
    return G.nack_owed ? acks_still_owed() : 0;
}

/* ---- UDP replies ---- */

int ns_udp_send(int family, const uint8_t *src, uint16_t sport, const uint8_t *dst, uint16_t dport,
                const uint8_t *payload, size_t len) {
    if (!G.open) return NS_ESTATE;
    if (family != 4 && family != 6) return NS_EINVAL;
    size_t hl = family == 4 ? 20 : 40;
    if (len + 8 + hl > (size_t)G.netif.mtu || len + 8 > 0xffff) return NS_ETOOBIG;
    uint8_t *o = G.scratch;
    memset(o, 0, hl + 8);
    uint8_t *u = o + hl;
    const uint8_t *s, *d;
    if (family == 4) {
        o[0] = 0x45;
        wr16(o + 2, (uint16_t)(hl + 8 + len));
        wr16(o + 4, (uint16_t)ns_rand32());
        o[8] = 64;
        o[9] = 17;
        memcpy(o + 12, src, 4);
        memcpy(o + 16, dst, 4);
        wr16(o + 10, csum_fold(csum_add(0, o, 20)));
        s = o + 12;
        d = o + 16;
    } else {
        o[0] = 0x60;
        wr16(o + 4, (uint16_t)(8 + len));
        o[6] = 17;
        o[7] = 64;
        memcpy(o + 8, src, 16);
        memcpy(o + 24, dst, 16);
        s = o + 8;
        d = o + 24;
    }
    wr16(u, sport);
    wr16(u + 2, dport);
    wr16(u + 4, (uint16_t)(8 + len));
    memcpy(u + 8, payload, len);
    uint16_t ck = l4_csum(family, s, d, 17, u, 8 + len);
    wr16(u + 6, ck == 0 ? 0xffff : ck);
    emit(o, hl + 8 + len);
    G.st.udp_out++;
    return NS_OK;
}

/* ---- ICMP: echo requests to the agent, real replies and unreachable errors back to the apps ---- */

static ns_icmp_stats icmp_st;

static void input_icmp(const ns_ip *ip) {
    const uint8_t *h = ip->l4;
    if ((ip->family == 4) != (ip->proto == 1)) { G.st.dropped_icmp++; return; } /* ICMPv4 in IPv6 ... */
    if (ip->l4len < 8) { G.st.dropped_malformed++; return; }
    if (h[0] != (ip->family == 4 ? 8 : 128) || h[1] != 0) { G.st.dropped_icmp++; return; }
    uint16_t ck = ip->family == 4 ? csum_fold(csum_add(0, h, ip->l4len))
                                  : l4_csum(6, ip->src, ip->dst, 58, h, ip->l4len);
    if (ck != 0) { G.st.dropped_checksum++; return; }
    size_t plen = ip->l4len - 8;
    if (grow((void **)&G.arena, &G.arena_cap, G.arena_len + plen + 1, 1)) { G.st.dropped_other++; return; }
    ns_tuple t;
    tuple_from(ip, rd16(h + 4), rd16(h + 6), &t);
    ns_event *e = push_event(NS_EV_ICMP_ECHO, 0);
    if (!e) { G.st.dropped_other++; return; }
    fill_addrs(e, &t);
    e->off = (uint32_t)G.arena_len;
    e->len = (uint32_t)plen;
    memcpy(G.arena + G.arena_len, h + 8, plen);
    G.arena_len += plen;
    icmp_st.echo_requests++;
}

/* An IP header from src to dst carrying `l4len` bytes of protocol `proto`; returns its length. */
static size_t icmp_ip_header(uint8_t *o, int family, const uint8_t *src, const uint8_t *dst, uint8_t proto,
                             size_t l4len) {
    if (family == 4) {
        memset(o, 0, 20);
        o[0] = 0x45;
        wr16(o + 2, (uint16_t)(20 + l4len));
        wr16(o + 4, (uint16_t)ns_rand32());
        o[8] = 64;
        o[9] = proto;
        memcpy(o + 12, src, 4);
        memcpy(o + 16, dst, 4);
        wr16(o + 10, csum_fold(csum_add(0, o, 20)));
        return 20;
    }
    memset(o, 0, 40);
    o[0] = 0x60;
    wr16(o + 4, (uint16_t)l4len);
    o[6] = proto;
    o[7] = 64;
    memcpy(o + 8, src, 16);
    memcpy(o + 24, dst, 16);
    return 40;
}

/* ICMP checksum: over the message (IPv4), or with the IPv6 pseudo header (ICMPv6). */
static void icmp_checksum(int family, const uint8_t *src, const uint8_t *dst, uint8_t *m, size_t len) {
    m[2] = m[3] = 0;
    wr16(m + 2, family == 4 ? csum_fold(csum_add(0, m, len)) : l4_csum(6, src, dst, 58, m, len));
}

int ns_icmp_echo_reply(int family, const uint8_t *src, const uint8_t *dst, uint16_t ident, uint16_t seq,
                       const uint8_t *payload, size_t len) {
    if (!G.open) return NS_ESTATE;
    if (family != 4 && family != 6) return NS_EINVAL;
    size_t hl = family == 4 ? 20 : 40;
    if (len + 8 + hl > (size_t)G.netif.mtu || len + 8 > 0xffff) return NS_ETOOBIG;
    uint8_t *o = G.scratch;
    icmp_ip_header(o, family, src, dst, family == 4 ? 1 : 58, 8 + len);
    uint8_t *m = o + hl;
    m[0] = family == 4 ? 0 : 129;
    m[1] = 0;
    wr16(m + 4, ident);
    wr16(m + 6, seq);
    memcpy(m + 8, payload, len);
    icmp_checksum(family, src, dst, m, 8 + len);
    emit(o, hl + 8 + len);
    icmp_st.echo_replies++;
    return NS_OK;
}

int ns_icmp_unreachable(int family, const uint8_t *reporter, const uint8_t *app, const uint8_t *dst,
                        int proto, uint16_t a, uint16_t b, int code) {
    static const uint8_t v4_codes[] = {0, 1, 3, 13}; /* net, host, port, communication prohibited */
    static const uint8_t v6_codes[] = {0, 3, 4, 1};  /* no route, address, port, admin prohibited */
    if (!G.open) return NS_ESTATE;
    if ((family != 4 && family != 6) || code < NS_UNREACH_NET || code > NS_UNREACH_PROHIBITED) return NS_EINVAL;
    int echo = proto == 1 || proto == 58;
    if (!echo && proto != 17) return NS_EINVAL;
    uint8_t qproto = echo ? (family == 4 ? 1 : 58) : 17;
    size_t hl = family == 4 ? 20 : 40;
    uint8_t *o = G.scratch;
    uint8_t *m = o + hl;        /* the ICMP error */
    uint8_t *q = m + 8;         /* the quoted original: IP header app -> dst, then 8 transport bytes */
    uint8_t *t = q + hl;
    icmp_ip_header(q, family, app, dst, qproto, 8);
    memset(t, 0, 8);
    if (echo) {
        t[0] = family == 4 ? 8 : 128;
        wr16(t + 4, a);
        wr16(t + 6, b);
        icmp_checksum(family, app, dst, t, 8);
    } else {
        wr16(t, a);
        wr16(t + 2, b);
        wr16(t + 4, 8);
        if (family == 6) { uint16_t ck = l4_csum(6, app, dst, 17, t, 8); wr16(t + 6, ck ? ck : 0xffff); }
    }
    size_t mlen = 8 + hl + 8;
    icmp_ip_header(o, family, reporter, app, family == 4 ? 1 : 58, mlen);
    memset(m, 0, 8);
    m[0] = family == 4 ? 3 : 1;
    m[1] = family == 4 ? v4_codes[code] : v6_codes[code];
    icmp_checksum(family, reporter, app, m, mlen);
    emit(o, hl + mlen);
    icmp_st.unreachable_sent++;
    return NS_OK;
}

void ns_get_icmp_stats(ns_icmp_stats *s) { *s = icmp_st; }

/* ---- lifecycle ---- */

int ns_version(void) { return NS_ABI_VERSION; }

void ns_set_verify_checksums(int on) {
    G.verify_checksums = on ? 1 : 0;
    /* lwIP checks TCP (the glue checks SYNs and UDP itself); generation stays on for everything. */
    NETIF_SET_CHECKSUM_CTRL(&G.netif, on ? NETIF_CHECKSUM_ENABLE_ALL
                                         : (u16_t)(NETIF_CHECKSUM_ENABLE_ALL & ~NETIF_CHECKSUM_CHECK_TCP));
}

int ns_open(int mtu, int max_flows) {
    if (G.open) return NS_ESTATE;
    if (mtu < 1280 || mtu > NS_MAX_PACKET || max_flows < 1) return NS_EINVAL;
    if (!G.lwip_ready) {
        lwip_init();
        G.ext_id = tcp_ext_arg_alloc_id();
        G.lwip_ready = 1;
    }
    G.listeners = calloc(65536, sizeof *G.listeners);
    if (!G.listeners) return NS_EMEM;
    G.out_fd = -1;
    G.max_flows = max_flows;
    ip4_addr_t any4 = {0}, mask = {0};
    if (!netif_add(&G.netif, &any4, &mask, &any4, NULL, netif_init_cb, ip_input)) return NS_EMEM;
    G.netif.mtu = (u16_t)mtu;
    G.netif.mtu6 = (u16_t)mtu;
    ip6_addr_t six;
    memset(&six, 0, sizeof six);
    six.addr[0] = PP_HTONL(0xfd000000ul);
    six.addr[3] = PP_HTONL(1ul);
    netif_ip6_addr_set(&G.netif, 0, &six);
    netif_ip6_addr_set_state(&G.netif, 0, IP6_ADDR_VALID);
    netif_set_default(&G.netif);
    netif_set_link_up(&G.netif);
    netif_set_up(&G.netif);
    ns_set_verify_checksums(1);
    G.open = 1;
    return NS_OK;
}

void ns_close(void) {
    if (!G.open) return;
    ns_test_freeze_events(0);
    for (uint32_t i = 0; i < G.nslots; i++) {
        if (G.slots[i]) {
            ns_flow *f = G.slots[i];
            if (f->pcb) { struct tcp_pcb *p = f->pcb; detach_pcb(f); tcp_abort(p); }
            f->state = FLOW_CLOSED;
            flow_free(f);
        }
    }
    /* Released flows may have left pcbs finishing their close in lwIP: end them too. */
    while (tcp_active_pcbs) tcp_abort(tcp_active_pcbs);
    while (tcp_tw_pcbs) tcp_abort(tcp_tw_pcbs);
    for (uint32_t port = 0; port < 65536; port++) {
        if (G.listeners[port]) tcp_close(G.listeners[port]);
    }
    free(G.listeners);
    G.listeners = NULL;
    G.st.listeners = 0;
    netif_remove(&G.netif);
    free(G.slots); free(G.free_idx); free(G.buckets);
    G.slots = NULL; G.free_idx = NULL; G.buckets = NULL;
    G.nslots = G.nfree = G.nbuckets = G.hcount = 0;
    G.hash_incomplete = 0;
    memset(G.orphans, 0, sizeof G.orphans); /* (already: every pcb was freed above, each counted out) */
    free(G.events); free(G.arena); free(G.out); free(G.pending_out); free(G.ack_owed);
    G.events = NULL; G.arena = NULL; G.out = NULL; G.pending_out = NULL; G.ack_owed = NULL;
    G.npending_out = G.cap_pending_out = G.nack_owed = G.cap_ack_owed = 0;
    G.nevents = G.cap_events = G.arena_len = G.arena_cap = G.out_len = G.out_cap = 0;
    uint64_t mem = G.st.mem_in_use;
    memset(&G.st, 0, sizeof G.st);
    G.st.mem_in_use = mem;
    memset(&icmp_st, 0, sizeof icmp_st);
    G.open = 0;
}

void ns_set_output_fd(int fd) { G.out_fd = fd; }

void ns_set_clock(int manual, uint64_t now_ms) {
    int switched = manual != G.manual_clock;
    G.manual_clock = manual;
    G.now_ms = now_ms;
    /* lwIP's timers survive a close and reopen with absolute due times: after a switch between the
     * monotonic and the manual clock they would be due ages away (or at once). Rebase them. */
    if (switched && G.lwip_ready) sys_restart_timeouts();
}

void ns_get_stats(ns_stats *s) {
    *s = G.st;
    uint64_t a = 0, t = 0;
    for (struct tcp_pcb *p = tcp_active_pcbs; p; p = p->next) a++;
    for (struct tcp_pcb *p = tcp_tw_pcbs; p; p = p->next) t++;
    s->pcbs_active = a;
    s->pcbs_time_wait = t;
}
