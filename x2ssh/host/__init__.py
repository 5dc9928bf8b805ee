"""The machine's side of a VPN run: TUN, routes, DNS, firewall, and the journal that undoes them.

Everything below this package changes the host and needs root; nothing here imports the session. The
platform implementations live in `host.linux` (and later `host.windows`).
"""
