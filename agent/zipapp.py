"""Build the agent zipapp in memory (client side), from the agent's own source files.

The archive holds only what runs on the server: `agent/__init__.py`, `agent/protocol.py`,
`agent/netio.py`, `agent/agent_main.py` and a `__main__.py` entry point. Entries carry a fixed
timestamp, so the same sources always give the same bytes (and the same `agent_digest()`).
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile

SERVER_MODULES = ("__init__.py", "protocol.py", "netio.py", "agent_main.py")
ENTRY_POINT = b"import sys\nfrom agent.agent_main import main\n\nsys.exit(main())\n"
SHEBANG = b"#!/usr/bin/env python3\n"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def build_zipapp() -> bytes:
    """Return the zipapp as bytes, ready to upload and run with `python3 FILE`."""
    here = os.path.dirname(os.path.abspath(__file__))
    buffer = io.BytesIO()
    buffer.write(SHEBANG)
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo("__main__.py", _FIXED_TIME), ENTRY_POINT)
        for name in SERVER_MODULES:
            with open(os.path.join(here, name), "rb") as source:
                archive.writestr(zipfile.ZipInfo("agent/" + name, _FIXED_TIME), source.read())
    return buffer.getvalue()


def agent_digest() -> str:
    """Short sha256 of the zipapp, to name the agent build in logs."""
    return hashlib.sha256(build_zipapp()).hexdigest()[:12]
