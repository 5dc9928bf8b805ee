"""The Windows host backend: sans-IO plans (`plan`), a thin ctypes executor (`iphlpapi`, `wfp`, `wintun`,
`console`), the Wintun packet port and the `HostControl` that composes them (`host.WindowsHost`). Only the
plans, the thread logic and the host control's orchestration have been run (on Linux, with fakes); see
README.md in this folder for exactly what is and is not verified.

Importing this package registers the undo function of each journal record a Windows run writes, as
`x2ssh.host.linux` does for Linux (`x2ssh.host.journal.PLATFORM_PACKAGE`).
"""

from x2ssh.host.journal import register_undo
from x2ssh.host.windows import records

register_undo(records.ROUTE_RECORD, records.undo_route_record)
