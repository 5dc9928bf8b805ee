/*
 * lwIP options for x2ssh's netstack: a NO_SYS, raw-API TCP stack that terminates connections for any
 * destination arriving on one virtual (TUN) interface. UDP and ICMP never reach lwIP: the glue handles
 * them (see ns_glue.c), so lwIP's own UDP, ICMP replies, ARP, DHCP, DNS and friends are compiled out.
 *
 * Memory comes from libc (no fixed pools); the number of flows is capped by the glue instead.
 */
#ifndef X2SSH_LWIPOPTS_H
#define X2SSH_LWIPOPTS_H

#define NO_SYS                          1
#define SYS_LIGHTWEIGHT_PROT            0
#define LWIP_TIMERS                     1
#define LWIP_NETCONN                    0
#define LWIP_SOCKET                     0
#define LWIP_SINGLE_NETIF               1
#define LWIP_NETIF_STATUS_CALLBACK      0
#define LWIP_NETIF_LINK_CALLBACK        0
#define LWIP_HAVE_LOOPIF                0
#define LWIP_NETIF_LOOPBACK             0

/* Memory: libc malloc, counted by the glue so tests can prove nothing leaks. MEM_SIZE only selects a
 * 32-bit mem_size_t (packets up to 64 KiB). */
#define MEM_LIBC_MALLOC                 1
#define MEMP_MEM_MALLOC                 1
#define MEM_ALIGNMENT                   8
#define MEM_SIZE                        (64 * 1024 * 1024)
#define mem_clib_malloc                 ns_mem_malloc
#define mem_clib_free                   ns_mem_free
#define mem_clib_calloc                 ns_mem_calloc
#include <stddef.h>
void *ns_mem_malloc(size_t size);
void ns_mem_free(void *ptr);
void *ns_mem_calloc(size_t count, size_t size);

/* Protocols */
#define LWIP_IPV4                       1
#define LWIP_IPV6                       1
#define LWIP_ARP                        0
#define LWIP_ETHERNET                   0
#define LWIP_RAW                        0
#define LWIP_UDP                        0
#define LWIP_ICMP                       0
#define LWIP_DHCP                       0
#define LWIP_AUTOIP                     0
#define LWIP_IGMP                       0
#define LWIP_DNS                        0
#define IP_REASSEMBLY                   0   /* the glue drops fragments before lwIP sees them */
#define IP_FRAG                         0   /* segments are sized to the MTU; never fragment */
#define IP_DEFAULT_TTL                  64
#define LWIP_IPV6_MLD                   0
#define LWIP_IPV6_AUTOCONFIG            0
#define LWIP_IPV6_SEND_ROUTER_SOLICIT   0
#define LWIP_IPV6_DUP_DETECT_ATTEMPTS   0
#define LWIP_IPV6_FRAG                  0
#define LWIP_IPV6_REASS                 0
#define IPV6_FRAG_COPYHEADER            1
#define LWIP_IPV6_SCOPES                0
#define LWIP_ND6_QUEUEING               0
#define LWIP_ICMP6                      1   /* required by LWIP_IPV6; ICMPv6 input is dropped by the glue */

/* TCP. TCP_MSS is the ceiling; the effective MSS follows the netif MTU set at run time. */
#define LWIP_TCP                        1
#define TCP_MSS                         65495
#define TCP_CALCULATE_EFF_SEND_MSS      1
#define LWIP_WND_SCALE                  1
#define TCP_RCV_SCALE                   7
#define TCP_WND                         (1024 * 1024)
#define TCP_SND_BUF                     (1024 * 1024)
#define TCP_SND_QUEUELEN                4096
#define TCP_SNDLOWAT                    (TCP_SND_BUF / 2)
#define TCP_SNDQUEUELOWAT               (TCP_SND_QUEUELEN / 2)
#define TCP_OVERSIZE                    TCP_MSS
#define TCP_QUEUE_OOSEQ                 1
#define LWIP_TCP_SACK_OUT               1
#define LWIP_TCP_MAX_SACK_NUM           4
#define LWIP_TCP_TIMESTAMPS             0
#define LWIP_TCP_KEEPALIVE              0
#define TCP_LISTEN_BACKLOG              0
#define LWIP_TCP_PCB_NUM_EXT_ARGS       1   /* passive_open hook: attach a flow to its pcb at SYN time */
#define TCP_MSL                         1000UL  /* TIME_WAIT = 2 s: the peer is the local kernel */
#define TCP_MAXRTX                      7   /* give up on a silent local app after ~6 min, not 40 */
#define TCP_SYNMAXRTX                   4
#define TCP_TMR_INTERVAL                250
#define LWIP_DISABLE_TCP_SANITY_CHECKS  1   /* large MSS and windows overflow the u16 sanity checks */
#define PBUF_POOL_SIZE                  4   /* the pool is unused: every pbuf is PBUF_RAM */
#define PBUF_POOL_BUFSIZE               1536
#define LWIP_NETIF_TX_SINGLE_PBUF       1
#define LWIP_CHECKSUM_ON_COPY           1

/* Checksums: generate everything (the kernel verifies what we write to the TUN). The IP header check is
 * done by the glue; TCP's is kept so a corrupted segment can never become payload, unless the owner says
 * the packets come from the local kernel (ns_set_verify_checksums: per netif, hence the control below). */
#define LWIP_CHECKSUM_CTRL_PER_NETIF    1
#define CHECKSUM_GEN_IP                 1
#define CHECKSUM_GEN_TCP                1
#define CHECKSUM_CHECK_IP               0
#define CHECKSUM_CHECK_TCP              1
#define CHECKSUM_CHECK_ICMP6            0

#define LWIP_STATS                      0
#define LWIP_STATS_DISPLAY              0
#define MIB2_STATS                      0
#define LWIP_PERF                       0

#endif /* X2SSH_LWIPOPTS_H */
