"""Where flows come from: `vpn` (a TUN device and netstack) and the SOCKS5/HTTP CONNECT proxy (`socks`,
`socks_protocol`, `socks_udp`, `socks_backend`; run by `proxy`).

Each front end hands its flows to the same `x2ssh.session.SshSession`: pool, reconnection, agent, DNS.
"""
