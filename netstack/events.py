"""Events a :class:`netstack.Stack` produces: small frozen dataclasses, one per thing that happened."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from netstack.stack import TcpFlow

Address = tuple[str, int]


class CloseReason(Enum):
    """Why a TCP connection ended without us releasing it."""

    NORMAL = 0
    RESET = 1
    TIMEOUT = 2
    ERROR = 3


@dataclass(frozen=True, slots=True)
class TcpConnectRequest:
    """An app sent a SYN: call ``flow.accept()`` (handshake completes) or ``flow.refuse()`` (RST)."""

    flow: TcpFlow


@dataclass(frozen=True, slots=True)
class TcpDataReceived:
    """Bytes from the app wait in ``flow.read()``; one event until the flow's receive queue is drained."""

    flow: TcpFlow


@dataclass(frozen=True, slots=True)
class TcpEndOfStream:
    """The app half-closed (FIN) after its last byte; the other direction may still carry data."""

    flow: TcpFlow


@dataclass(frozen=True, slots=True)
class TcpWritable:
    """The send buffer drained after a short ``flow.write()``: write again."""

    flow: TcpFlow


@dataclass(frozen=True, slots=True)
class TcpClosed:
    """The connection is gone; the flow has been released.

    A ``NORMAL`` close (both sides sent FIN) comes only after every received byte was read from the flow,
    so nothing the app sent is lost; a reset, a timeout or an error comes at once and drops unread bytes.
    """

    flow: TcpFlow
    reason: CloseReason


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """A UDP datagram the app sent: from ``src`` (the app) to ``dst`` (where it wanted it to go)."""

    src: Address
    dst: Address
    payload: bytes


@dataclass(frozen=True, slots=True)
class IcmpEchoRequest:
    """An app pinged ``dst`` from ``src`` (hosts, no ports) with identifier ``ident`` and sequence ``seq``.

    Answer it only with the real target's reply (``Stack.icmp_echo_reply``) or an error
    (``Stack.icmp_unreachable``): never fake one.
    """

    src: str
    dst: str
    ident: int
    seq: int
    payload: bytes


Event = (
    TcpConnectRequest
    | TcpDataReceived
    | TcpEndOfStream
    | TcpWritable
    | TcpClosed
    | UdpDatagram
    | IcmpEchoRequest
)
