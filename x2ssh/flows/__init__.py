"""Flows from any front end onto SSH: TCP over direct-tcpip channels, UDP through the agent, DNS over TCP."""
