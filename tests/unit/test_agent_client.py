"""The client's agent link (`x2ssh.agent_client.link.AgentHandle`) without SSH: lifecycle corner cases."""

from __future__ import annotations

import asyncio
import collections
import gc

from x2ssh.agent_client.link import AgentHandle, AgentSettings, ServerPython


class FakeProcess:
    def close(self) -> None:
        pass


def make_handle() -> AgentHandle:
    python = ServerPython("python3", (3, 11), "linux", "/usr/bin/python3")
    return AgentHandle(
        FakeProcess(), "/tmp/.x2ssh-agent-x", "/tmp/.x2ssh-agent-x/agent.sock", python, bytes(32),
        AgentSettings(), collections.deque(),
    )  # fmt: skip


def test_link_failing_before_anyone_waits_for_welcome_logs_nothing() -> None:
    """Deployment gave up (e.g. streamlocal refused) and shut the link down: no "never retrieved" error."""
    reported: list[dict] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: reported.append(context))
        handle = make_handle()
        handle._shutdown("deployment failed")
        assert handle.closed
        del handle
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(main())
    gc.collect()
    assert reported == []
