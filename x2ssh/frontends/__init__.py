"""Where flows come from: `vpn` (a TUN device and netstack) and `socks` (a SOCKS5/HTTP CONNECT proxy).

Each front end hands its flows to the same `x2ssh.session.SshSession`: pool, reconnection, agent, DNS.
"""
