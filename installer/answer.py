"""The answer file (TOML): its schema, and loading it with errors that name the key.

One file may describe several nodes. Top-level keys are shared by every node; each
``[[node]]`` table is keyed by ``match.mac`` or ``match.serial`` (SMBIOS system serial)
and overrides the shared keys (tables merge key by key, but ``cluster`` is replaced
whole; lists replace). A file without
``[[node]]`` describes one node and fits any machine::

    root_password_hash = "$y$j9T$..."          # shared
    ssh_keys = ["ssh-ed25519 AAAA... admin"]
    ntp = ["ntp.example.com"]

    [[node]]
    match.mac = "52:54:00:00:00:01"
    hostname = "node1"
    network = { mac = "52:54:00:00:00:01", mode = "static", address = "10.0.0.11/24", gateway = "10.0.0.1" }
    disks.install = { size_min = "100GiB", rotational = false }
    cluster = { mode = "init" }

The schema only checks the file on its own; whether it fits a machine (disks, NICs,
which node this machine is) is ``installer.matching``'s job.
"""

from __future__ import annotations

import base64
import binascii
import copy
import ipaddress
import re
import tomllib
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    IPvAnyAddress,
    IPvAnyInterface,
    ValidationError,
    model_validator,
)

from installer.errors import AnswerError

_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_CRYPT = re.compile(r"^\$(y|gy|7|2[abxy]|5|6|1)\$[^\s:]+$")
_SSH_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
              "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com")
# What `cairn cluster token create` prints (appliance.services.cluster.create_join_token):
# CJ1.<the cluster CA's SHA-256>.<token id>.<secret>
_TOKEN = re.compile(r"^CJ1\.[0-9a-f]{64}\.[0-9a-f-]{1,64}\.[A-Za-z0-9_-]{16,256}$")
CLUSTER_API_PORT = 8443


def normalize_mac(value: object) -> str:
    """``52-54-00-AB-CD-EF`` and ``52:54:00:ab:cd:ef`` are the same NIC; unicast only."""
    if not isinstance(value, str):
        raise ValueError("a MAC address is a string like 52:54:00:12:34:56")
    mac = value.strip().lower().replace("-", ":")
    if not _MAC.match(mac):
        raise ValueError(f"{value!r} is not a MAC address like 52:54:00:12:34:56")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"{value!r} is a multicast address, not a NIC's")
    return mac


def _hostname(value: str) -> str:
    name = value.strip().lower().rstrip(".")
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{value!r} is not a host name (letters, digits and '-', labels of 1-63 characters)")
    if labels[0].isdigit():
        raise ValueError(f"{value!r}: the first label must not be all digits")
    return name


def _host_or_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return _hostname(value)


def _crypt_hash(value: str) -> str:
    if not _CRYPT.match(value):
        raise ValueError("not a crypt(3) password hash (e.g. from `mkpasswd -m yescrypt` or "
                         "`openssl passwd -6`); plain-text passwords are refused")
    return value


def _ssh_key(value: str) -> str:
    parts = value.strip().split(None, 2)
    if len(parts) < 2 or parts[0] not in _SSH_TYPES:
        raise ValueError("not an SSH public key line ('<type> <base64> [comment]', type one of "
                         f"{', '.join(_SSH_TYPES)})")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key's base64 part does not decode")
    size = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if blob[4:4 + size].decode("ascii", "replace") != parts[0]:
        raise ValueError(f"the key data is not a {parts[0]} key")
    return " ".join(parts)


def _timezone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (e.g. UTC, Europe/Vienna)")
    return value


def normalize_fingerprint(value: str) -> str:
    """``sha256:AB:CD:…`` or 64 hex digits (colons optional) → 64 lowercase hex digits."""
    fp = value.strip().lower().removeprefix("sha256:").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", fp):
        raise ValueError("a TLS fingerprint is the certificate's SHA-256: 64 hex digits, colons allowed "
                         "(`openssl x509 -noout -fingerprint -sha256 -in cert.pem`)")
    return fp


def _interface(value: object) -> object:
    if isinstance(value, str) and "/" not in value:
        raise ValueError(f"{value!r} has no prefix length: write it as address/prefix, e.g. 10.0.0.11/24")
    return value


def _https_url(value: str) -> str:
    if not value.startswith("https://") or len(value) <= len("https://"):
        raise ValueError("the webhook URL must be https:// (it carries the node's install result)")
    return value


Mac = Annotated[str, BeforeValidator(normalize_mac)]
Hostname = Annotated[str, AfterValidator(_hostname)]
HostOrIp = Annotated[str, AfterValidator(_host_or_ip)]
IpInterface = Annotated[IPvAnyInterface, BeforeValidator(_interface)]
Fingerprint = Annotated[str, AfterValidator(normalize_fingerprint)]
BondMode = Literal["active-backup", "802.3ad", "balance-alb", "balance-tlb", "balance-xor", "balance-rr"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiskFilter(_Model):
    """Which disk: every criterion given must hold. ``model``/``serial`` are shell globs
    (case-insensitive). A disk that holds data (partitions or signatures) is only
    taken with ``wipe = true``."""

    size_min: ByteSize | None = None
    size_max: ByteSize | None = None
    model: str | None = None
    serial: str | None = None
    rotational: bool | None = None
    wipe: bool = False

    @model_validator(mode="after")
    def _sizes(self) -> DiskFilter:
        if self.size_min is not None and self.size_max is not None and self.size_min > self.size_max:
            raise ValueError(f"size_min: {self.size_min.human_readable()} is larger than "
                             f"size_max ({self.size_max.human_readable()})")
        return self

    def describe(self) -> str:
        values = {k: getattr(self, k) for k in ("size_min", "size_max", "model", "serial", "rotational")}
        parts = [f"{k}={v.human_readable(decimal=True)}" if isinstance(v, ByteSize) else f"{k}={v!r}"
                 for k, v in values.items() if v is not None]
        return ", ".join(parts) or "any disk"


class DataDisks(DiskFilter):
    """Data disks (Ceph OSDs): exactly ``count`` disks must match."""

    count: int = Field(1, ge=1, le=256)


class Disks(_Model):
    install: DiskFilter
    data: list[DataDisks] = []


class Bond(_Model):
    macs: list[Mac] = Field(min_length=2)
    mode: BondMode = "active-backup"

    @model_validator(mode="after")
    def _unique(self) -> Bond:
        if len(set(self.macs)) != len(self.macs):
            raise ValueError("macs: a MAC appears twice")
        return self


class Network(_Model):
    """The management network. The NIC is chosen by MAC (``mac``, or ``bond.macs``),
    never by name: names differ between machines and kernels."""

    mac: Mac | None = None
    bond: Bond | None = None
    vlan: int | None = Field(None, ge=1, le=4094)
    mtu: int | None = Field(None, ge=576, le=9216)
    mode: Literal["dhcp", "static"] = "dhcp"
    address: IpInterface | None = None
    gateway: IPvAnyAddress | None = None
    dns: list[IPvAnyAddress] = []
    search: list[Hostname] = []

    @model_validator(mode="after")
    def _consistent(self) -> Network:
        if (self.mac is None) == (self.bond is None):
            raise ValueError("set either mac (one NIC) or bond.macs (a bond of several), exactly one of them")
        if self.mode == "static":
            if self.address is None:
                raise ValueError("address: required with mode = \"static\" (e.g. 10.0.0.11/24)")
            net = self.address.network
            if net.version == 4 and net.prefixlen < 31 and self.address.ip in (net.network_address,
                                                                                net.broadcast_address):
                raise ValueError(f"address: {self.address} is the network's own or broadcast address")
            if self.gateway is not None:
                if self.gateway.version != self.address.version or self.gateway not in net:
                    raise ValueError(f"gateway: {self.gateway} is not in {net}")
                if self.gateway == self.address.ip:
                    raise ValueError(f"gateway: {self.gateway} is the node's own address")
        elif self.address is not None or self.gateway is not None:
            raise ValueError("address and gateway go with mode = \"static\"; DHCP brings its own")
        return self

    @property
    def macs(self) -> list[str]:
        return list(self.bond.macs) if self.bond else [self.mac] if self.mac else []


class Cluster(_Model):
    """``init``: this node bootstraps a new cluster. ``join``: it joins the cluster of the
    member at ``address`` with a token from ``cairn cluster token create`` on a member
    (single-use: one per joining node). No cluster section: a stand-alone single node.
    ``timing`` (init only; joiners inherit it): ``fast`` for dedicated hardware, ``relaxed``
    for slow or oversubscribed machines (``cairn cluster init --timing``)."""

    mode: Literal["init", "join"]
    address: str | None = None
    token: str | None = Field(None, repr=False)
    timing: Literal["fast", "relaxed"] | None = None

    @model_validator(mode="after")
    def _join_needs(self) -> Cluster:
        if self.mode == "join":
            if not self.address or not self.token:
                raise ValueError(f"{'address' if not self.address else 'token'}: required with mode = \"join\" "
                                 "(a member's address, and a token from `cairn cluster token create` on it)")
            try:
                _host_or_ip(self.address)
            except ValueError:
                raise ValueError(f"address: {self.address!r} is not a member's host name or IP address (the "
                                 f"cluster's API port, {CLUSTER_API_PORT}, is implied)")
            if not _TOKEN.match(self.token):
                raise ValueError("token: not a join token: CJ1.<CA fingerprint>.<id>.<secret>, as "
                                 "`cairn cluster token create` prints it")
            if self.timing is not None:
                raise ValueError("timing: only with mode = \"init\" (a joining node runs the cluster's)")
        elif self.address is not None or self.token is not None:
            key = "address" if self.address is not None else "token"
            raise ValueError(f"{key}: only with mode = \"join\" (an init node makes the cluster)")
        return self


class Webhook(_Model):
    url: Annotated[str, AfterValidator(_https_url)]
    fingerprint: Fingerprint | None = None


class InstallOptions(_Model):
    after: Literal["reboot", "poweroff"] = "reboot"
    webhook: Webhook | None = None


class NodeAnswer(_Model):
    """Everything the installer needs for one node."""

    hostname: Hostname
    root_password_hash: Annotated[str, AfterValidator(_crypt_hash)] = Field(repr=False)
    ssh_keys: list[Annotated[str, AfterValidator(_ssh_key)]] = []
    timezone: Annotated[str, AfterValidator(_timezone)] = "UTC"
    network: Network
    ntp: list[HostOrIp] = []
    disks: Disks
    cluster: Cluster | None = None
    install: InstallOptions = InstallOptions()

    @property
    def node_name(self) -> str:
        return self.hostname.split(".")[0]


class Match(_Model):
    mac: Mac | None = None
    serial: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> Match:
        if (self.mac is None) == (self.serial is None):
            raise ValueError("give exactly one of match.mac or match.serial (the SMBIOS system serial)")
        return self

    def describe(self) -> str:
        return f"mac {self.mac}" if self.mac else f"serial {self.serial!r}"


@dataclass(frozen=True)
class NodeEntry:
    """One node of the file: its key (None in a one-node file) and its merged answer."""

    index: int
    match: Match | None
    answer: NodeAnswer

    @property
    def label(self) -> str:
        if self.match is None:
            return "the node"
        return f"node[{self.index}] ({self.match.describe()})"


@dataclass(frozen=True)
class AnswerFile:
    nodes: list[NodeEntry]
    data: dict[str, Any]  # the file as parsed, for baking into an ISO or the installed node

    @property
    def single(self) -> bool:
        return len(self.nodes) == 1 and self.nodes[0].match is None


# Tables a node replaces whole instead of merging: a node that inits must not inherit the
# shared join address and token.
REPLACED_TABLES = frozenset({"cluster"})


def _merge(base: dict[str, Any], over: dict[str, Any], top: bool = True) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not (top and key in REPLACED_TABLES):
            out[key] = _merge(out[key], value, top=False)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _loc_text(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _present(data: Any, loc: tuple[int | str, ...]) -> bool:
    for part in loc:
        in_list = isinstance(part, int) and isinstance(data, list) and part < len(data)
        in_table = isinstance(part, str) and isinstance(data, dict) and part in data
        if not (in_list or in_table):
            return False
        data = data[part]
    return True


_KEYED = re.compile(r"^([a-z_]+): (.*)$", re.S)


def _message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required"
    return str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _problems(exc: ValidationError, entry: dict[str, Any] | None, prefix: str) -> list[str]:
    """Name each error by where the user wrote the key: the node's table, or the top level."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        text = _message(err)
        keyed = _KEYED.match(text) if err["type"] == "value_error" else None
        if keyed:  # a check across keys names the key it blames: "gateway: ..."
            loc, text = (*loc, keyed.group(1)), keyed.group(2)
        if err["type"] == "missing" and entry is not None:
            text = f"required (set it in {prefix} or at the top level)"
        if prefix and (entry is None or err["type"] == "missing" or _present(entry, loc[:1])):
            where = _loc_text((prefix, *loc))
        else:
            where = _loc_text(loc)  # a shared key from the top level
        out.append(f"{where or '(top level)'}: {text}")
    return out


def load_answer(data: dict[str, Any], source: str = "answer file") -> AnswerFile:
    """Validate a parsed answer file; raise AnswerError listing every problem."""
    data = dict(data)
    problems: list[str] = []
    version = data.pop("version", 1)
    if version != 1:
        problems.append(f"version: {version!r} is not supported (this installer reads version = 1)")
    raw_nodes = data.pop("node", None)
    entries: list[NodeEntry] = []
    if raw_nodes is None:
        try:
            entries.append(NodeEntry(0, None, NodeAnswer.model_validate(data)))
        except ValidationError as exc:
            problems += _problems(exc, None, "")
    elif not isinstance(raw_nodes, list) or not all(isinstance(n, dict) for n in raw_nodes):
        problems.append("node: write each node as a [[node]] table")
    elif not raw_nodes:
        problems.append("node: the list of nodes is empty")
    else:
        for i, raw in enumerate(raw_nodes):
            raw = dict(raw)
            prefix = f"node[{i}]"
            match: Match | None = None
            try:
                match = Match.model_validate(raw.pop("match", {}))
            except ValidationError as exc:
                problems += _problems(exc, None, f"{prefix}.match")
            try:
                answer = NodeAnswer.model_validate(_merge(data, raw))
            except ValidationError as exc:
                problems += _problems(exc, raw, prefix)
                continue
            if match is not None:
                entries.append(NodeEntry(i, match, answer))
    problems += _cross_node_problems(entries)
    problems = list(dict.fromkeys(problems))  # a shared key's error once, not once per node
    if problems:
        raise AnswerError(problems, source)
    return AnswerFile(entries, {"version": 1, **data, **({"node": raw_nodes} if raw_nodes is not None else {})})


def _cross_node_problems(entries: list[NodeEntry]) -> list[str]:
    """What no single node shows: one MAC, serial, host name or address used twice; two inits."""
    problems: list[str] = []
    owners: dict[tuple[str, str], str] = {}

    def claim(kind: str, value: str, who: str, where: str) -> None:
        prev = owners.setdefault((kind, value), who)
        if prev != who:
            why = " (tokens are single-use: create one per joining node)" if kind == "join token" else ""
            problems.append(f"{where}: {kind} {value} is also used by {prev}; two nodes cannot share one {kind}{why}")

    for e in entries:
        who, prefix = e.label, f"node[{e.index}]"
        if e.match and e.match.mac:
            claim("MAC", e.match.mac, who, f"{prefix}.match.mac")
        if e.match and e.match.serial:
            claim("serial", e.match.serial, who, f"{prefix}.match.serial")
        for mac in dict.fromkeys(e.answer.network.macs):
            if e.match is None or mac != e.match.mac:
                claim("MAC", mac, who, f"{prefix}.network")
        claim("hostname", e.answer.node_name, who, f"{prefix}.hostname")
        if e.answer.network.address is not None:
            claim("address", str(e.answer.network.address.ip), who, f"{prefix}.network.address")
        if e.answer.cluster is not None and e.answer.cluster.token:  # named by its id: the secret is never shown
            claim("join token", "id " + e.answer.cluster.token.split(".")[2], who, f"{prefix}.cluster.token")
    inits = [e.label for e in entries if e.answer.cluster and e.answer.cluster.mode == "init"]
    if len(inits) > 1:
        problems.append(f"cluster.mode: {len(inits)} nodes would each make a new cluster ({', '.join(inits)}); "
                        "exactly one node inits, the others join it")
    return problems


def parse_answer(text: str, source: str = "answer file") -> AnswerFile:
    """Parse and validate TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AnswerError([f"not valid TOML: {exc}"], source)
    return load_answer(data, source)


def read_answer(path: Path) -> AnswerFile:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise AnswerError([f"cannot read it: {exc}"], str(path))
    return parse_answer(text, str(path))
