"""The Windows host backend: sans-IO plans (`plan`), a thin ctypes executor (`iphlpapi`, `wfp`, `wintun`,
`console`) and the Wintun packet port. Only the plans and the thread logic have been run (on Linux, with
fakes); see README.md in this folder for exactly what is and is not verified.
"""
