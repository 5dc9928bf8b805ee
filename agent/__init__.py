"""The x2ssh UDP agent: its framing protocol (`agent.protocol`) and the server program (`agent.agent_main`).

Everything in this package runs on the SSH server too: stdlib only, Python 3.8+.
"""
