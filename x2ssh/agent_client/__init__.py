"""Reaching the UDP agent on the server: upload, start, and the framed link to it."""
