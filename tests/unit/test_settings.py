"""Command line and TOML config parsing into Settings."""

from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from x2ssh.errors import UsageError
from x2ssh.settings import DEFAULT_MTU, DEFAULT_STATE_DIR, Settings, parse_args


def vpn(*args: str) -> Settings:
    return parse_args(["--vpn", *args])


def test_defaults():
    s = vpn("host.example")
    assert s.vpn and not s.vpn_cleanup
    assert (s.destination, s.host, s.user, s.port) == ("host.example", "host.example", None, None)
    assert s.vpn_mtu == DEFAULT_MTU == 65535
    assert s.vpn_tun == "x2ssh0"
    assert s.vpn_dns == "remote"
    assert s.vpn_exclude == () and s.identities == () and s.jump == () and s.ssh_options == ()
    assert (s.keepalive_interval, s.keepalive_count_max) == (15.0, 3)
    assert (s.retry_max, s.retry_initial, s.retry_max_delay) == (None, 1.0, 30.0)
    assert not s.vpn_kill_switch
    assert s.state_dir == DEFAULT_STATE_DIR
    assert (s.verbose, s.quiet, s.config) == (0, False, None)


@pytest.mark.parametrize(
    ("destination", "user", "host", "port"),
    [
        ("alice@host:2222", "alice", "host", 2222),
        ("alias", None, "alias", None),
        ("198.18.0.2", None, "198.18.0.2", None),
        ("[fd00::1]:22", None, "fd00::1", 22),
        ("bob@[fd00::1]", "bob", "fd00::1", None),
        ("fd00::1", None, "fd00::1", None),
        ("ssh://bob@h:23", "bob", "h", 23),
        ("a@b@host", "a@b", "host", None),
    ],
)
def test_destination_forms(destination, user, host, port):
    s = vpn(destination)
    assert (s.user, s.host, s.port) == (user, host, port)
    assert s.destination == destination


@pytest.mark.parametrize(
    "destination", ["user@", "@host", "[fd00::1", "[fd00::1]x", "host:99999", "host:abc", ":22"]
)
def test_bad_destination(destination):
    with pytest.raises(UsageError, match="destination"):
        vpn(destination)


def test_port_and_user_options_win_over_destination():
    s = vpn("-p", "2200", "-l", "carol", "alice@host:2222")
    assert (s.user, s.port) == ("carol", 2200)


def test_missing_destination():
    with pytest.raises(UsageError, match="DESTINATION is required"):
        parse_args(["--vpn"])


def test_vpn_flag_required_and_cleanup_needs_no_destination():
    with pytest.raises(UsageError, match="--vpn or -D is required"):
        parse_args(["host"])
    s = parse_args(["--vpn-cleanup"])
    assert s.vpn_cleanup and not s.vpn and s.destination is None
    with pytest.raises(UsageError, match="exclude each other"):
        parse_args(["--vpn", "--vpn-cleanup", "host"])


def test_dynamic_alone_or_beside_the_vpn():
    alone = parse_args(["-D", "1080", "host"])
    assert (alone.vpn, alone.dynamic) == (False, ("localhost", 1080))
    beside = parse_args(["--vpn", "-D", "127.0.0.1:1081", "host"])
    assert (beside.vpn, beside.dynamic, beside.host) == (True, ("127.0.0.1", 1081), "host")
    with pytest.raises(UsageError, match="-D and --vpn-cleanup exclude each other"):
        parse_args(["--vpn-cleanup", "-D", "1080"])


def test_jump_parsing():
    assert vpn("-J", "a,b", "-J", "u@c:2200", "h").jump == ("a", "b", "u@c:2200")
    assert vpn("--jump", "none", "h").jump == ()
    with pytest.raises(UsageError, match="empty hop"):
        vpn("-J", "a,,b", "h")
    with pytest.raises(UsageError, match="destination"):
        vpn("-J", "a,u@", "h")


def test_ssh_options():
    s = vpn(
        "-o", "ConnectTimeout=5",
        "-o", "stricthostkeychecking yes",
        "-o", "UserKnownHostsFile=/tmp/kh",
        "-o", "Port=2200",
        "-o", "User=dave",
        "-o", "IdentityFile=/k2",
        "-i", "/k1",
        "-o", "ServerAliveInterval=7",
        "-o", "ServerAliveCountMax=9",
        "-o", "ProxyJump=j1,j2",
        "h",
    )  # fmt: skip
    assert s.ssh_options == (
        ("ConnectTimeout", "5"),
        ("StrictHostKeyChecking", "yes"),
        ("UserKnownHostsFile", "/tmp/kh"),
    )
    assert s.ssh_option("connecttimeout") == "5"
    assert s.ssh_option("IdentitiesOnly") is None
    assert (s.port, s.user) == (2200, "dave")
    assert s.identities == ("/k1", "/k2")
    assert (s.keepalive_interval, s.keepalive_count_max) == (7.0, 9)
    assert s.jump == ("j1", "j2")


def test_explicit_options_win_over_dash_o():
    s = vpn("-p", "22", "-l", "erin", "-J", "x", "--keepalive-interval", "3", "-o", "Port=2200",
            "-o", "User=dave", "-o", "ProxyJump=y", "-o", "ServerAliveInterval=7", "h")  # fmt: skip
    assert (s.port, s.user, s.jump, s.keepalive_interval) == (22, "erin", ("x",), 3.0)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("Ciphers=aes128-ctr", "unsupported option"),
        ("StrictHostKeyChecking=maybe", "StrictHostKeyChecking"),
        ("ConnectTimeout=soon", "ConnectTimeout"),
        ("Port=0", "out of range"),
        ("ConnectTimeout", "KEY=VALUE"),
        ("=5", "KEY=VALUE"),
    ],
)
def test_bad_ssh_options(option, message):
    with pytest.raises(UsageError, match=message):
        vpn("-o", option, "h")


def test_excludes_v4_v6_and_normalisation():
    s = vpn("--vpn-exclude", "198.18.0.0/15", "--vpn-exclude", "fd00::/8", "--vpn-exclude", "198.18.5.7/24",
            "--vpn-exclude", "198.18.9.9", "h")  # fmt: skip
    assert s.vpn_exclude == (
        ip_network("198.18.0.0/15"),
        ip_network("fd00::/8"),
        ip_network("198.18.5.0/24"),
        ip_network("198.18.9.9/32"),
    )


@pytest.mark.parametrize("cidr", ["198.18.0.0/33", "nonsense", "198.18.0.0/", "fd00::/129", "300.1.1.1/8"])
def test_bad_cidr(cidr):
    with pytest.raises(UsageError, match=r"--vpn-exclude .*not a CIDR"):
        vpn("--vpn-exclude", cidr, "h")


def test_exclude_everything_is_refused():
    with pytest.raises(UsageError, match="everything"):
        vpn("--vpn-exclude", "0.0.0.0/0", "h")


@pytest.mark.parametrize(("mtu", "ok"), [("1280", True), ("65535", True), ("1279", False), ("65536", False),
                                          ("abc", False), ("0", False)])  # fmt: skip
def test_mtu_bounds(mtu, ok):
    if ok:
        assert vpn("--vpn-mtu", mtu, "h").vpn_mtu == int(mtu)
    else:
        with pytest.raises(UsageError, match="--vpn-mtu"):
            vpn("--vpn-mtu", mtu, "h")


@pytest.mark.parametrize(
    ("name", "ok"),
    [("x2-h.0_", True), ("a" * 15, True), ("a" * 16, False), ("a/b", False), ("a b", False), ("", False),
     ("..", False), ("tün", False)],
)  # fmt: skip
def test_tun_name(name, ok):
    if ok:
        assert vpn("--vpn-tun", name, "h").vpn_tun == name
    else:
        with pytest.raises(UsageError, match="--vpn-tun"):
            vpn("--vpn-tun", name, "h")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("remote", "remote"),
        ("OFF", "off"),
        ("198.18.0.53", ip_address("198.18.0.53")),
        ("fd00::53", ip_address("fd00::53")),
    ],
)
def test_vpn_dns(value, expected):
    assert vpn("--vpn-dns", value, "h").vpn_dns == expected


def test_bad_vpn_dns():
    with pytest.raises(UsageError, match="--vpn-dns"):
        vpn("--vpn-dns", "resolver.example", "h")


def test_reconnect_settings():
    s = vpn("--retry-max", "5", "--retry-initial", "0.5", "--retry-max-delay", "10",
            "--keepalive-interval", "0", "--keepalive-count-max", "2", "--vpn-kill-switch", "h")  # fmt: skip
    assert (s.retry_max, s.retry_initial, s.retry_max_delay) == (5, 0.5, 10.0)
    assert (s.keepalive_interval, s.keepalive_count_max, s.vpn_kill_switch) == (0.0, 2, True)
    assert vpn("--retry-max", "forever", "h").retry_max is None
    assert vpn("--retry-max", "0", "h").retry_max == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--retry-max", "-1"], "--retry-max"),
        (["--retry-initial", "0"], "--retry-initial"),
        (["--retry-initial", "5", "--retry-max-delay", "2"], "below"),
        (["--keepalive-interval", "nan"], "--keepalive-interval"),
        (["--keepalive-count-max", "0"], "--keepalive-count-max"),
    ],
)
def test_bad_reconnect_settings(args, message):
    with pytest.raises(UsageError, match=message):
        vpn(*args, "h")


def test_verbosity():
    assert vpn("-vv", "h").verbose == 2
    assert vpn("-q", "h").quiet
    with pytest.raises(UsageError, match="exclude each other"):
        vpn("-v", "-q", "h")


def test_unknown_option_is_usage_error():
    with pytest.raises(UsageError, match="unrecognized"):
        vpn("--vpn-bogus", "h")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "x2ssh.toml"
    path.write_text(text)
    return str(path)


def test_toml_merge_command_line_wins(tmp_path):
    config = write(
        tmp_path,
        """
destination = "alice@from-file:2022"
vpn-mtu = 9000
vpn_tun = "x2file0"
vpn-exclude = ["198.18.0.0/16", "fd00::/8"]
identity = "~/.ssh/id_file"
jump = ["j1", "j2"]
vpn-kill-switch = true
retry-max = 4
option = { ConnectTimeout = 10, StrictHostKeyChecking = "accept-new" }
""",
    )
    from_file = parse_args(["--vpn", "--config", config])
    assert (from_file.user, from_file.host, from_file.port) == ("alice", "from-file", 2022)
    assert (from_file.vpn_mtu, from_file.vpn_tun, from_file.vpn_kill_switch, from_file.retry_max) == (
        9000,
        "x2file0",
        True,
        4,
    )
    assert from_file.vpn_exclude == (ip_network("198.18.0.0/16"), ip_network("fd00::/8"))
    assert from_file.identities == ("~/.ssh/id_file",)
    assert from_file.jump == ("j1", "j2")
    assert from_file.ssh_options == (("ConnectTimeout", "10"), ("StrictHostKeyChecking", "accept-new"))
    assert from_file.config == Path(config)

    s = parse_args(["--vpn", "--config", config, "--vpn-mtu", "1500", "--vpn-exclude", "198.18.3.0/24",
                    "--no-vpn-kill-switch", "-o", "ConnectTimeout=3", "bob@cli-host"])  # fmt: skip
    assert (s.user, s.host, s.port) == ("bob", "cli-host", None)
    assert s.vpn_mtu == 1500
    assert s.vpn_tun == "x2file0"
    assert s.vpn_exclude == (ip_network("198.18.3.0/24"),)  # replaced, not merged
    assert s.vpn_kill_switch is False
    assert s.ssh_option("ConnectTimeout") == "3" and s.ssh_option("StrictHostKeyChecking") == "accept-new"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vpn-mtu = 100\n", "--vpn-mtu"),
        ("bogus = 1\n", "unknown setting 'bogus'"),
        ("vpn = true\n", "unknown setting 'vpn'"),
        ("vpn-exclude = ['198.18.0.0/33']\n", "not a CIDR"),
        ("vpn-kill-switch = 'yes'\n", "true or false"),
        ("vpn-exclude = [1, 2]\n", "list of strings"),
        ("vpn-mtu = \n", "not valid TOML"),
    ],
)
def test_bad_config_file(tmp_path, text, message):
    with pytest.raises(UsageError, match=message):
        parse_args(["--vpn", "--config", write(tmp_path, text), "h"])


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read config file"):
        parse_args(["--vpn", "--config", str(tmp_path / "absent.toml"), "h"])
