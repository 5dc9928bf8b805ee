"""ICMP for the apps, written to the TUN through the netstack: the `IcmpToApp` the UDP relay calls."""

from __future__ import annotations

import logging
from collections.abc import Callable

from netstack import LocalProtocolError
from netstack.aio import TunStack

log = logging.getLogger(__name__)

Address = tuple[str, int]


class IcmpToTun:
    """Delivers echo replies and unreachable errors to the apps; a no-op while there is no TUN stack."""

    def __init__(self, stack: Callable[[], TunStack | None]) -> None:
        self._stack = stack

    def echo_reply(self, target: str, app: str, ident: int, seq: int, payload: bytes) -> None:
        stack = self._stack()
        if stack is None:
            return
        try:
            stack.icmp_echo_reply(target, app, ident, seq, payload)
        except LocalProtocolError as exc:
            log.debug("echo reply of %d bytes not delivered: %s", len(payload), exc)

    def unreachable(self, reporter: str, app: Address, dst: Address, code: int, echo: bool) -> None:
        stack = self._stack()
        if stack is None:
            return
        try:
            stack.icmp_unreachable(reporter, app, dst, code, echo)
        except LocalProtocolError as exc:
            log.debug("unreachable error for %s not delivered: %s", app, exc)
