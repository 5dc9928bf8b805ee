"""Front ends: where flows come from (a SOCKS5 / HTTP CONNECT proxy port; the VPN's TUN later)."""
