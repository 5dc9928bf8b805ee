"""netstack: raw IP packets in, TCP and UDP flows and ICMP echo requests out — a sans-IO API over lwIP.

``Stack`` is the sans-IO core (packets and time in, events and packets out); ``netstack.aio.TunStack``
attaches one to a TUN file descriptor on an asyncio loop and exposes flows as asyncio transports.
"""

from netstack.errors import FlowClosedError, LocalProtocolError, NetstackError, StackBusyError
from netstack.events import (
    Address,
    CloseReason,
    Event,
    IcmpEchoRequest,
    TcpClosed,
    TcpConnectRequest,
    TcpDataReceived,
    TcpEndOfStream,
    TcpWritable,
    UdpDatagram,
)
from netstack.stack import Stack, StackConfig, TcpFlow

__all__ = [
    "Address",
    "CloseReason",
    "Event",
    "FlowClosedError",
    "IcmpEchoRequest",
    "LocalProtocolError",
    "NetstackError",
    "Stack",
    "StackBusyError",
    "StackConfig",
    "TcpClosed",
    "TcpConnectRequest",
    "TcpDataReceived",
    "TcpEndOfStream",
    "TcpFlow",
    "TcpWritable",
    "UdpDatagram",
]
