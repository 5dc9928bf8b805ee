"""The SSH side (runs as the user): connecting like OpenSSH, asyncssh tuning, resolving outside the tunnel."""
