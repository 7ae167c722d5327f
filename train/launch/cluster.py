"""Where the job runs: nodes, this node's rank, the rendezvous address and port.

Three modes, first match wins:
  manual      NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT all exported (as in the QAD users' guide)
  slurm       SLURM_JOB_ID present: nodes and rank from SLURM, MASTER_ADDR from the
              first host of the expanded node list (never a localhost fallback)
  standalone  one machine, rendezvous on 127.0.0.1
Stdlib only: the launchers call this before anything expensive.
"""

import re
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass

PORT_BASE, PORT_SPAN = 20000, 20000  # MASTER_PORT = 20000 + job id % 20000


class ClusterError(RuntimeError):
    """The node list or rendezvous address cannot be worked out."""


@dataclass(frozen=True)
class ClusterEnv:
    mode: str  # manual | slurm | standalone
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    procs_per_node: int
    job_id: str | None
    nodelist: str | None = None

    @property
    def world_size(self) -> int:
        return self.nnodes * self.procs_per_node

    def as_dict(self) -> dict:
        return {**asdict(self), "world_size": self.world_size}


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed node list to host names, as `scontrol show hostnames` does:
    'gpu[01-03,7],cpu1' -> gpu01 gpu02 gpu03 gpu7 cpu1; 'r[1-2]-n[1-2]' -> r1-n1 r1-n2 r2-n1 r2-n2."""
    hosts = []
    for name in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):
        hosts.extend(_expand_name(name))
    return hosts


def _expand_name(name: str) -> list[str]:
    match = re.search(r"\[([^\]]+)\]", name)
    if not match:
        return [name]
    head, tail = name[:match.start()], name[match.end():]
    expanded = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        for number in range(int(low), int(high or low) + 1):
            expanded.extend(f"{head}{number:0{len(low)}d}{rest}" for rest in _expand_name(tail))
    return expanded


def first_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                                capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()[0]
    return expand_hostlist(nodelist)[0]


def node_address(host: str) -> str:
    """The address SLURM itself uses for `host` (NodeAddr), which must resolve here."""
    address = host
    if shutil.which("scontrol"):
        result = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True, text=True)
        found = re.search(r"\bNodeAddr=(\S+)", result.stdout)
        if result.returncode == 0 and found:
            address = found.group(1)
    try:
        socket.getaddrinfo(address, None)
    except socket.gaierror as error:
        raise ClusterError(f"MASTER_ADDR: the first node {host!r} (address {address!r}) does not "
                           f"resolve ({error.strerror}); export MASTER_ADDR to a reachable address") from None
    return address


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _int(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ClusterError(f"{name}={env[name]!r} is not an integer") from None


def detect(env: dict[str, str], procs_per_node: int) -> ClusterEnv:
    manual = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    if all(env.get(name) for name in manual):
        nnodes, node_rank = _int(env, "NNODES"), _int(env, "NODE_RANK")
        if not 0 <= node_rank < nnodes:
            raise ClusterError(f"NODE_RANK={node_rank} is outside 0..{nnodes - 1} (NNODES={nnodes})")
        return ClusterEnv("manual", nnodes, node_rank, env["MASTER_ADDR"], _int(env, "MASTER_PORT"),
                          procs_per_node, env.get("SLURM_JOB_ID"))
    if env.get("SLURM_JOB_ID"):
        in_step = bool(env.get("SLURM_STEP_ID")) and env.get("SLURM_STEP_NODELIST")
        nodelist = env["SLURM_STEP_NODELIST"] if in_step else env.get("SLURM_JOB_NODELIST", "")
        nnodes = int((env.get("SLURM_STEP_NUM_NODES") if in_step else None) or env.get("SLURM_NNODES") or 1)
        if not nodelist:
            raise ClusterError("SLURM_JOB_ID is set but SLURM_JOB_NODELIST is empty")
        master_addr = env.get("MASTER_ADDR") or node_address(first_host(nodelist))
        port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else \
            PORT_BASE + int(re.sub(r"\D", "", env["SLURM_JOB_ID"]) or 0) % PORT_SPAN
        return ClusterEnv("slurm", nnodes, int(env.get("SLURM_NODEID") or 0), master_addr, port,
                          procs_per_node, env["SLURM_JOB_ID"], nodelist)
    port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else free_port()
    return ClusterEnv("standalone", 1, 0, "127.0.0.1", port, procs_per_node, None)
