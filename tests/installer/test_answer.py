"""Answer-file schema: what is accepted, and errors that name the key to fix."""

from __future__ import annotations

import pytest

from installer.answer import parse_answer
from installer.errors import AnswerError
from tests.installer.conftest import TOKEN, TOKEN2

pytestmark = pytest.mark.unit

HASH = "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7"
KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGsRnY9D6xUFYvNqsz+ET8C1r8eqUqXAvDfxNQk7eUtE admin@laptop")
ONE = f'''
hostname = "node1.example.com"
root_password_hash = "{HASH}"
ssh_keys = ["{KEY}"]
ntp = ["ntp.example.com", "10.0.0.1"]
timezone = "Europe/Vienna"
[network]
mac = "52-54-00-AB-CD-01"
mode = "static"
address = "10.0.0.11/24"
gateway = "10.0.0.1"
dns = ["10.0.0.1"]
[disks.install]
size_min = "100GiB"
rotational = false
[cluster]
mode = "init"
'''
MULTI = f'''
root_password_hash = "{HASH}"
disks.install = {{ model = "INTEL*" }}
network.mode = "dhcp"
cluster = {{ mode = "join", address = "10.0.0.11", token = "{TOKEN}" }}

[[node]]
match.mac = "52:54:00:00:00:01"
hostname = "node1"
network.mac = "52:54:00:00:00:01"
cluster = {{ mode = "init" }}

[[node]]
match.serial = "7XK2QH3"
hostname = "node2"
network.bond = {{ macs = ["52:54:00:00:00:02", "52:54:00:00:00:03"], mode = "802.3ad" }}
network.vlan = 100
network.mtu = 9000
'''


def problems(text: str) -> list[str]:
    with pytest.raises(AnswerError) as err:
        parse_answer(text)
    return err.value.problems


def test_a_one_node_file_is_read_with_normalized_values() -> None:
    a = parse_answer(ONE)
    assert a.single
    node = a.nodes[0].answer
    assert node.node_name == "node1"
    assert node.network.mac == "52:54:00:ab:cd:01"
    assert str(node.network.address) == "10.0.0.11/24"
    assert node.disks.install.size_min == 100 * 2**30
    assert node.cluster is not None and node.cluster.mode == "init"
    assert node.ssh_keys == [KEY]


def test_nodes_inherit_top_level_keys_and_override_them() -> None:
    a = parse_answer(MULTI)
    n1, n2 = (e.answer for e in a.nodes)
    assert n1.cluster is not None and n1.cluster.mode == "init"
    assert n2.cluster is not None and n2.cluster.mode == "join" and n2.cluster.address == "10.0.0.11"
    assert n1.disks.install.model == n2.disks.install.model == "INTEL*"
    assert n2.network.bond is not None and n2.network.macs == ["52:54:00:00:00:02", "52:54:00:00:00:03"]
    assert n2.network.mode == "dhcp" and n2.network.vlan == 100
    assert a.nodes[1].match is not None and a.nodes[1].match.serial == "7XK2QH3"


@pytest.mark.parametrize(("change", "expected"), [
    (("hostname = \"node1.example.com\"", "hostname = \"-bad-\""), "hostname: '-bad-' is not a host name"),
    (("hostname = \"node1.example.com\"", "hostnme = \"x\""), "hostnme: unknown key"),
    ((f'"{HASH}"', '"hunter2"'), "root_password_hash: not a crypt(3) password hash"),
    ((KEY, "ssh-ed25519 AAAAB3NzaC1yc2E= x"), "ssh_keys[0]: the key data is not a ssh-ed25519 key"),
    (('timezone = "Europe/Vienna"', 'timezone = "Mars/Olympus"'), "timezone: unknown time zone 'Mars/Olympus'"),
    (('mac = "52-54-00-AB-CD-01"', 'mac = "52:54:00:ab:cd"'), "network.mac: '52:54:00:ab:cd' is not a MAC address"),
    (('mac = "52-54-00-AB-CD-01"', 'mac = "01:00:5e:00:00:01"'), "network.mac: '01:00:5e:00:00:01' is a multicast"),
    (('mac = "52-54-00-AB-CD-01"', 'name = "eth0"'), "network.name: unknown key"),
    (('address = "10.0.0.11/24"', 'address = "10.0.0.11"'), "network.address: '10.0.0.11' has no prefix"),
    (('gateway = "10.0.0.1"', 'gateway = "10.9.0.1"'), "network.gateway: 10.9.0.1 is not in 10.0.0.0/24"),
    (('address = "10.0.0.11/24"\n', ''), "network.address: required with mode = \"static\""),
    (('size_min = "100GiB"', 'size_min = "lots"'), "disks.install.size_min: could not parse value and unit"),
    (('size_min = "100GiB"', 'size_min = "2TB"\nsize_max = "1TB"'), "disks.install.size_min: 1.8TiB is larger"),
    (('[disks.install]\nsize_min = "100GiB"\nrotational = false\n', ''), "disks: required"),
    (('mode = "init"', 'mode = "join"'), "cluster.address: required with mode = \"join\""),
    (('mode = "init"', 'mode = "join"\naddress = "10.0.0.11"\ntoken = "has spaces in it, not a token"'),
     "cluster.token: not a join token"),
    (('mode = "init"', 'mode = "join"\naddress = "10.0.0.11"\ntoken = "short"'), "cluster.token: not a join token"),
    (('mode = "init"', f'mode = "join"\naddress = "10.0.0.11"\ntoken = "{TOKEN.replace("CJ1.5e", "CJ1.5")}"'),
     "cluster.token: not a join token: CJ1.<CA fingerprint>"),  # a fingerprint cut short
    (('mode = "init"', 'mode = "join"\naddress = "10.0.0.11"\ntoken = "K10abc::node.secret0123456789"'),
     "cluster.token: not a join token"),  # another product's token
    (('mode = "init"', f'mode = "join"\naddress = "no such host!"\ntoken = "{TOKEN}"'),
     "cluster.address: 'no such host!' is not a member's host name or IP address"),
    (('mode = "init"', f'mode = "join"\naddress = "10.0.0.11:8443"\ntoken = "{TOKEN}"'),
     "cluster.address: '10.0.0.11:8443' is not a member's host name or IP address (the cluster's API port, 8443"),
    (('mode = "init"', f'mode = "init"\ntoken = "{TOKEN}"'), "cluster.token: only with mode = \"join\""),
    (('mode = "init"', 'mode = "bootstrap"'), "cluster.mode: Input should be 'init' or 'join'"),
    (('mode = "init"', 'mode = "init"\ntiming = "quick"'), "cluster.timing: Input should be 'fast' or 'relaxed'"),
    (('mode = "init"', f'mode = "join"\naddress = "10.0.0.11"\ntoken = "{TOKEN}"\ntiming = "relaxed"'),
     "cluster.timing: only with mode = \"init\" (a joining node runs the cluster's)"),
])
def test_a_bad_value_is_reported_with_its_key(change: tuple[str, str], expected: str) -> None:
    text = ONE.replace(*change)
    assert text != ONE
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_at_once() -> None:
    text = ONE.replace('hostname = "node1.example.com"', 'hostname = "a_b"') \
        .replace('"10.0.0.1"]\ntimezone', '"ntp!"]\ntimezone') \
        .replace("gateway = \"10.0.0.1\"", "gateway = \"10.1.0.1\"")
    found = problems(text)
    assert sorted(p.split(":")[0] for p in found) == ["hostname", "network.gateway", "ntp[1]"]


def test_a_bond_needs_two_distinct_nics_and_excludes_mac() -> None:
    assert any(p.startswith("network.bond.macs: List should have at least 2 items") for p in problems(
        ONE.replace('mac = "52-54-00-AB-CD-01"', 'bond.macs = ["52:54:00:00:00:01"]')))
    assert any(p.startswith("network.bond.macs: a MAC appears twice") for p in problems(
        ONE.replace('mac = "52-54-00-AB-CD-01"', 'bond.macs = ["52:54:00:00:00:01", "52-54-00-00-00-01"]')))
    assert any(p.startswith("network: set either mac (one NIC) or bond.macs") for p in problems(
        ONE.replace('mac = "52-54-00-AB-CD-01"', 'mac = "52:54:00:00:00:01"\nbond.macs = ["52:54:00:00:00:02", '
                    '"52:54:00:00:00:03"]')))


def test_in_a_multi_node_file_a_nodes_error_names_the_node_and_a_shared_error_the_top_level() -> None:
    found = problems(MULTI.replace("network.vlan = 100", "network.vlan = 5000")
                     .replace('disks.install = { model = "INTEL*" }', 'disks.install = { modle = "INTEL*" }'))
    assert "node[1].network.vlan: Input should be less than or equal to 4094" in found
    assert "disks.install.modle: unknown key" in found  # once, though both nodes inherit it
    assert len([p for p in found if "modle" in p]) == 1


def test_a_node_missing_a_required_key_is_told_where_it_may_go() -> None:
    found = problems(MULTI.replace('hostname = "node2"\n', ""))
    assert found == ["node[1].hostname: required (set it in node[1] or at the top level)"]


def test_two_nodes_with_one_mac_are_refused() -> None:
    found = problems(MULTI.replace('"52:54:00:00:00:02", "52:54:00:00:00:03"',
                                   '"52:54:00:00:00:01", "52:54:00:00:00:03"'))
    assert found == ["node[1].network: MAC 52:54:00:00:00:01 is also used by node[0] (mac 52:54:00:00:00:01); "
                     "two nodes cannot share one MAC"]
    found = problems(MULTI.replace('match.serial = "7XK2QH3"', 'match.mac = "52:54:00:00:00:01"'))
    assert any(p.startswith("node[1].match.mac: MAC 52:54:00:00:00:01 is also used by node[0]") for p in found)


def test_two_nodes_with_one_hostname_or_two_inits_are_refused() -> None:
    found = problems(MULTI.replace('hostname = "node2"', 'hostname = "node1"'))
    assert any(p.startswith("node[1].hostname: hostname node1 is also used by node[0]") for p in found)
    found = problems(MULTI.replace('network.mtu = 9000', 'network.mtu = 9000\ncluster = { mode = "init" }'))
    assert any(p.startswith("cluster.mode: 2 nodes would each make a new cluster") for p in found)


def test_a_node_needs_exactly_one_match_key() -> None:
    found = problems(MULTI.replace('match.serial = "7XK2QH3"\n', ""))
    assert found == ["node[1].match: give exactly one of match.mac or match.serial (the SMBIOS system serial)"]


def test_not_toml_and_wrong_versions_are_refused() -> None:
    assert problems("hostname = ")[0].startswith("not valid TOML:")
    assert problems("version = 2\n" + ONE)[0].startswith("version: 2 is not supported")
    assert problems("node = 3\n" + ONE) == ["node: write each node as a [[node]] table"]


def test_two_nodes_with_one_join_token_are_refused_without_showing_it() -> None:
    both = MULTI.replace('network.mtu = 9000', 'network.mtu = 9000\n[[node]]\nmatch.mac = "52:54:00:00:00:09"\n'
                         'hostname = "node3"\nnetwork.mac = "52:54:00:00:00:09"')
    found = problems(both)
    assert found == ["node[2].cluster.token: join token id 0b5f6a52-8d0e-4c0e-9d43-1f2a3b4c5d6e is also used by "
                     "node[1] (serial '7XK2QH3'); two nodes cannot share one join token (tokens are single-use: "
                     "create one per joining node)"]
    assert parse_answer(both.replace('hostname = "node3"', f'hostname = "node3"\ncluster = {{ mode = "join", '
                                     f'address = "10.0.0.11", token = "{TOKEN2}" }}'))


def test_a_token_made_by_the_cluster_is_accepted_as_it_is_printed() -> None:
    import secrets

    from appliance.db.models import new_id
    from appliance.services.cluster import TOKEN_PREFIX, parse_token

    made = f"{TOKEN_PREFIX}.{secrets.token_hex(32)}.{new_id()}.{secrets.token_urlsafe(24)}"  # create_join_token's
    answer = parse_answer(ONE.replace('mode = "init"', f'mode = "join"\naddress = "node0"\ntoken = "{made}"'))
    token = answer.nodes[0].answer.cluster.token if answer.nodes[0].answer.cluster else None
    assert token == made and parse_token(made)[1] == made.split(".")[2]


def test_the_token_never_shows_in_the_answers_repr() -> None:
    a = parse_answer(MULTI)
    assert "join-secret" not in repr(a.nodes[1].answer)
    assert HASH not in repr(a.nodes[1].answer)
