"""Linux implementation of the host layer: TUN device, routes (netlink), DNS, nftables firewall.

Importing this package registers the journal undo function of every change kind these modules record.
"""

from x2ssh.host import rundir
from x2ssh.host.journal import register_undo
from x2ssh.host.linux import dns, firewall, routes, tun

register_undo(firewall.KILL_SWITCH_RECORD, firewall.undo_killswitch_record)
register_undo(firewall.MARK_RESTORE_RECORD, firewall.undo_mark_restore_record)
register_undo(routes.ROUTE_RECORD, routes.undo_route_record)
register_undo(routes.RULE_RECORD, routes.undo_rule_record)
register_undo(routes.SYSCTL_RECORD, routes.undo_sysctl_record)
register_undo(dns.RESOLV_CONF_RECORD, dns.undo_resolv_conf_record)
register_undo(dns.RESOLVED_RECORD, dns.undo_resolved_record)
register_undo(dns.RESOLVCONF_RECORD, dns.undo_resolvconf_record)
register_undo(tun.TUN_RECORD, tun.undo_tun_record)
register_undo(rundir.RUN_DIR_RECORD, rundir.undo_run_dir_record)
