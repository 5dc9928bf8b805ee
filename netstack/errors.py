"""Exceptions of the netstack API, named by whose fault they are."""

from __future__ import annotations


class NetstackError(Exception):
    """Base class of netstack errors."""


class LocalProtocolError(NetstackError):
    """The caller used the API wrongly (e.g. accepted a flow twice, wrote after shutdown)."""


class FlowClosedError(NetstackError):
    """The flow's connection is gone (reset, timed out or released)."""


class StackBusyError(NetstackError):
    """lwIP keeps global state: only one Stack may be open in a process."""
