"""Which local process is at the other end of a loopback TCP connection: its socket's inode from
/proc/net/tcp{,6}, the process holding it from /proc/*/fd, its ancestors and its program's name."""

from __future__ import annotations

import os
import re
import socket
import struct
from dataclasses import dataclass
from typing import Final

from tokenwatch import environ
from tokenwatch.process.processes import PROC, ProcessGone, process_info

MAX_ANCESTORS: Final = 64
"""Parents followed up from the caller (a deeper chain is cut there)."""
INTERPRETERS: Final = re.compile(r"(python|pypy|node|nodejs|deno|bun)[\d.]*")
"""Programs whose script, not themselves, names the caller (`python bot.py` is `bot`)."""
GENERIC_SCRIPTS: Final = frozenset({"cli", "index", "main", "__main__", "run", "start"})
"""Script names that say nothing: the directory holding them names the caller instead."""
_NAME_BAD: Final = re.compile(r"[^A-Za-z0-9._@:+-]+")

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Peer:
    """The process that opened a connection, as /proc showed it when it was looked up."""

    pid: int
    name: str
    """What an agent of its own is called (`program_name`)."""
    lineage: tuple[tuple[int, int], ...]
    """(pid, start time) of the process itself, then of its parent, and so on up."""
    run: tuple[str, str] = ("", "")
    """The agent and run id its environment names (`tokenwatch run` sets both for its tree)."""


def find_peer(server_end: Address, client_end: Address) -> Peer | None:
    """The process of ours whose socket is `client_end` connected to `server_end`; None when no
    such socket is found or its process is not ours to read (another user's)."""
    inode = socket_inode(server_end, client_end)
    if inode is None:
        return None
    pid = pid_of_inode(inode)
    if pid is None:
        return None
    try:
        argv = process_info(pid).argv
        return Peer(pid, program_name(argv) or f"pid-{pid}", lineage(pid), run_of(pid))
    except ProcessGone:
        return None


def socket_inode(server_end: Address, client_end: Address) -> int | None:
    """The inode of the client's socket: the one whose local end is `client_end` and whose
    remote end is `server_end`. One exact netlink query; /proc/net/tcp where netlink is refused."""
    try:
        return _diag_inode(server_end, client_end)
    except OSError:
        return _table_inode(server_end, client_end)


NETLINK_SOCK_DIAG: Final = 4
SOCK_DIAG_BY_FAMILY: Final = 20
NLMSG_ERROR: Final = 2
_REQUEST: Final = struct.Struct("=IHHII BBBBI HH16s16sI8s")
"""nlmsghdr, then inet_diag_req_v2 with its inet_diag_sockid (ports and addresses big-endian)."""
_INODE_AT: Final = 16 + 4 + 48 + 16
"""Offset of inet_diag_msg's idiag_inode after the nlmsghdr (family...retrans, sockid, 4 u32)."""


def _diag_inode(server_end: Address, client_end: Address) -> int | None:
    """The kernel's own lookup of one TCP socket by its four ends (sock_diag, no dump)."""
    v6 = ":" in server_end[0]
    family = socket.AF_INET6 if v6 else socket.AF_INET
    request = _REQUEST.pack(
        _REQUEST.size, SOCK_DIAG_BY_FAMILY, 1, 1, 0,  # NLM_F_REQUEST, sequence 1
        family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF,  # any state
        socket.htons(client_end[1]), socket.htons(server_end[1]),
        _packed(family, client_end[0]), _packed(family, server_end[0]),
        0, b"\xff" * 8,  # any interface; INET_DIAG_NOCOOKIE
    )  # fmt: skip
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(request, (0, 0))
        reply = nl.recv(65536)
    (kind,) = struct.unpack_from("=H", reply, 4)
    if kind == NLMSG_ERROR:
        (errno,) = struct.unpack_from("=i", reply, 16)
        if errno in (0, -2):  # ENOENT: no such socket
            return None
        raise OSError(-errno, os.strerror(-errno))
    (inode,) = struct.unpack_from("=I", reply, _INODE_AT)
    return int(inode) or None


def _packed(family: int, host: str) -> bytes:
    return socket.inet_pton(family, host.split("%")[0]).ljust(16, b"\0")


def _table_inode(server_end: Address, client_end: Address) -> int | None:
    """`socket_inode` read from /proc/net/tcp{,6} (the kernel prints every socket: slower)."""
    v6 = ":" in server_end[0]
    needle = f" {_hex(client_end, v6)} {_hex(server_end, v6)} ".encode()
    try:
        with open(f"{PROC}/net/{'tcp6' if v6 else 'tcp'}", "rb") as f:
            table = f.read()
    except OSError:
        return None
    at = table.find(needle)
    if at < 0:
        return None
    line = table[at : table.find(b"\n", at)].split()
    return int(line[8]) or None  # local, remote, st, queues, tr, retrnsmt, uid, timeout, inode


def _hex(address: Address, v6: bool) -> str:
    """An address as /proc/net/tcp prints it: each 32-bit word of the address in host order."""
    host, port = address[0], address[1]
    if v6:
        words = struct.unpack("=4I", socket.inet_pton(socket.AF_INET6, host.split("%")[0]))
        return "".join(f"{w:08X}" for w in words) + f":{port:04X}"
    (word,) = struct.unpack("=I", socket.inet_pton(socket.AF_INET, host))
    return f"{word:08X}:{port:04X}"


def pid_of_inode(inode: int) -> int | None:
    """The process holding socket `inode` open. Newest pids first: a caller has usually started
    after the processes around it, so the scan stops early."""
    target = f"socket:[{inode}]"
    pids = sorted((int(n) for n in os.listdir(PROC) if n.isdigit()), reverse=True)
    for pid in pids:
        try:
            with os.scandir(f"{PROC}/{pid}/fd") as fds:
                for fd in fds:
                    if _link(fd.path) == target:
                        return pid
        except OSError:  # gone, or another user's: not ours to attribute
            continue
    return None


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def lineage(pid: int) -> tuple[tuple[int, int], ...]:
    """(pid, start time) of `pid` and its ancestors, nearest first; ProcessGone if `pid` is."""
    chain: list[tuple[int, int]] = []
    while pid > 1 and len(chain) < MAX_ANCESTORS:
        try:
            info = process_info(pid)
        except ProcessGone:
            if not chain:
                raise
            break
        chain.append((pid, info.start_time))
        pid = info.ppid
    return tuple(chain)


def run_of(pid: int) -> tuple[str, str]:
    """TOKENWATCH_AGENT and TOKENWATCH_RUN_ID from the process's environment at its start."""
    try:
        with open(f"{PROC}/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return "", ""
    found = {environ.AGENT: "", environ.RUN_ID: ""}
    for entry in env.split(b"\0"):
        key, _, value = entry.decode(errors="replace").partition("=")
        if key in found:
            found[key] = value
    return found[environ.AGENT], found[environ.RUN_ID]


def program_name(argv: list[str]) -> str:
    """An agent name for a calling program: its executable's name (`codex`, `curl`), or for an
    interpreter its script's (`python bot.py` -> `bot`, `python -m pkg.tool` -> `pkg.tool`,
    `node .../bin/codex.js` -> `codex`; a script called cli, index or main takes its
    directory's name: `node .../claude-code/cli.js` -> `claude-code`)."""
    if not argv:
        return ""
    name = os.path.basename(argv[0])
    if INTERPRETERS.fullmatch(name):
        name = _script_of(argv[1:]) or name
    return _NAME_BAD.sub("-", name).strip("-.")[:64]


def _script_of(args: list[str]) -> str:
    for i, arg in enumerate(args):
        if arg == "-m":
            return args[i + 1] if i + 1 < len(args) else ""
        if arg in ("-c", "-e", "--eval", "-p", "--print", "-"):
            return ""
        if not arg.startswith("-"):
            stem = os.path.splitext(os.path.basename(arg))[0]
            if stem in GENERIC_SCRIPTS:
                parent = os.path.basename(os.path.dirname(os.path.abspath(arg)))
                return parent if parent not in ("bin", "dist", "lib", "src") else stem
            return stem
    return ""
