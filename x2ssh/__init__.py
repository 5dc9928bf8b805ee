"""x2ssh: a full-tunnel VPN over plain SSH."""

__version__ = "0.1.0"
