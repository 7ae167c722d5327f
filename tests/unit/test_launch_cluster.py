"""python -m pytest tests/unit/test_launch_cluster.py  (nodes, ranks, rendezvous: train/launch/cluster.py)"""

import os
import shutil
import socket
import subprocess

import pytest

from train.launch import cluster
from train.launch.cluster import ClusterError, detect, expand_hostlist

UNRESOLVABLE = "no-such-host-xyz.invalid"
ORIGINAL_ENV = dict(os.environ)  # scontrol may need SLURM_CONF and friends
SLURM_VALID_LISTS = ["node[1-2]", "gpu[01-03,7],cpu1", "a1", "node[8-10]", "x[009-011]", "a,b,c",
                     "node[1,3-4],login[01-02]", "h-[1-2]"]


@pytest.fixture(autouse=True)
def no_ambient_cluster(monkeypatch):
    """detect() gets its env as an argument; only PATH (for scontrol) is read from os.environ."""
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name)


@pytest.fixture
def no_scontrol(tmp_path, monkeypatch):
    """A PATH without scontrol: the pure-Python fallbacks."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("scontrol") is None


def fake_scontrol(tmp_path, monkeypatch, hostnames: list[str], node_addr: str | None):
    """An scontrol that expands to `hostnames` and reports `node_addr` (None: node unknown);
    it logs its arguments to the returned file."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    node_line = (f'echo "NodeName=$4 Arch=x86_64 NodeAddr={node_addr} NodeHostName=$4 Port=0"; exit 0'
                 if node_addr else 'echo "Node $4 not found"; exit 1')
    script = bin_dir / "scontrol"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        'if [ "$1 $2" = "show hostnames" ]; then\n'
        f"  printf '%s\\n' {' '.join(hostnames)}; exit 0\n"
        "fi\n"
        f'if [ "$1 $2" = "show node" ]; then {node_line}; fi\n'
        "exit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return log


# ----------------------------------------------------------------- host lists

@pytest.mark.parametrize("hostlist,hosts", [
    ("node[1-2]", ["node1", "node2"]),
    ("gpu[01-03,7],cpu1", ["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"]),
    ("a1", ["a1"]),
    ("node[8-10]", ["node8", "node9", "node10"]),
    ("x[009-011]", ["x009", "x010", "x011"]),
    ("a,b,c", ["a", "b", "c"]),
    ("node[1,3-4],login[01-02]", ["node1", "node3", "node4", "login01", "login02"]),
    ("h-[1-2]", ["h-1", "h-2"]),
    ("node5.cluster.local", ["node5.cluster.local"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_expand_hostlist_several_bracket_groups():
    assert expand_hostlist("rack[1-2]-n[1-2]") == ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]


@pytest.mark.parametrize("hostlist", SLURM_VALID_LISTS)
def test_expand_hostlist_agrees_with_scontrol(hostlist):
    # checked when the test runs, not at collection: on a fresh CI machine tests/slurm installs
    # SLURM after collection and before this file runs
    if shutil.which("scontrol") is None:
        pytest.skip("needs SLURM's scontrol as a reference")
    reference = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True,
                               env=ORIGINAL_ENV, timeout=30)
    if reference.returncode != 0:
        pytest.skip(f"scontrol cannot expand host lists here: {reference.stderr.strip()}")
    assert expand_hostlist(hostlist) == reference.stdout.split()


# ----------------------------------------------------------------- manual mode

MANUAL = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500"}


def test_manual_mode_takes_all_four_variables():
    env = detect(dict(MANUAL), procs_per_node=8)
    assert (env.mode, env.nnodes, env.node_rank, env.master_addr, env.master_port) == \
        ("manual", 2, 1, "10.1.2.3", 29500)
    assert env.world_size == 16 and env.procs_per_node == 8
    assert env.as_dict()["world_size"] == 16 and env.as_dict()["mode"] == "manual"


def test_manual_mode_wins_over_slurm():
    env = detect({**MANUAL, "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": UNRESOLVABLE, "SLURM_NNODES": "5",
                  "SLURM_NODEID": "3"}, procs_per_node=4)
    assert (env.mode, env.nnodes, env.node_rank, env.master_port) == ("manual", 2, 1, 29500)
    assert env.job_id == "77"


@pytest.mark.parametrize("rank", ["2", "-1", "10"])
def test_manual_node_rank_out_of_range(rank):
    with pytest.raises(ClusterError) as error:
        detect({**MANUAL, "NODE_RANK": rank}, procs_per_node=8)
    assert f"NODE_RANK={rank}" in str(error.value) and "0..1" in str(error.value)


@pytest.mark.parametrize("name,value", [("NNODES", "two"), ("NODE_RANK", "first"), ("MASTER_PORT", "29500x")])
def test_manual_non_integers(name, value):
    with pytest.raises(ClusterError, match=f"{name}='{value}' is not an integer"):
        detect({**MANUAL, name: value}, procs_per_node=8)


def test_manual_needs_every_variable(no_scontrol):
    env = detect({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3"}, procs_per_node=2)
    assert env.mode == "standalone" and env.nnodes == 1


# ----------------------------------------------------------------- SLURM mode

def slurm_env(job_id="123456", nodelist="localhost", nnodes="1", nodeid="0", **extra):
    return {"SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": nodelist, "SLURM_NNODES": nnodes,
            "SLURM_NODEID": nodeid, **extra}


def test_slurm_mode_single_node(no_scontrol):
    env = detect(slurm_env(), procs_per_node=8)
    assert env.mode == "slurm" and env.nnodes == 1 and env.node_rank == 0
    assert env.master_addr == "localhost"
    assert env.master_port == 23456  # 20000 + 123456 % 20000
    assert env.job_id == "123456" and env.nodelist == "localhost" and env.world_size == 8


@pytest.mark.parametrize("job_id,port", [("1", 20001), ("19999", 39999), ("20000", 20000), ("40001", 20001),
                                         ("987654321", 20000 + 987654321 % 20000)])
def test_master_port_from_job_id(job_id, port, no_scontrol):
    assert detect(slurm_env(job_id=job_id), procs_per_node=1).master_port == port
    assert 20000 <= port < 40000


def test_master_port_and_addr_can_be_overridden(no_scontrol):
    env = detect(slurm_env(MASTER_PORT="31000", MASTER_ADDR="10.9.9.9", nodelist=UNRESOLVABLE), procs_per_node=1)
    assert env.master_port == 31000 and env.master_addr == "10.9.9.9"


def test_multi_node_uses_nodeid_and_the_first_hosts_nodeaddr(tmp_path, monkeypatch):
    log = fake_scontrol(tmp_path, monkeypatch, ["node3", "node4"], node_addr="127.0.0.1")
    env = detect(slurm_env(nodelist="node[3-4]", nnodes="2", nodeid="1"), procs_per_node=8)
    assert (env.nnodes, env.node_rank, env.world_size) == (2, 1, 16)
    assert env.master_addr == "127.0.0.1"  # NodeAddr of node3, which itself does not resolve here
    calls = log.read_text().splitlines()
    assert "show hostnames node[3-4]" in calls and "show node -o node3" in calls


def test_unresolvable_first_host_raises_without_localhost_fallback(no_scontrol):
    with pytest.raises(ClusterError) as error:
        detect(slurm_env(nodelist=f"{UNRESOLVABLE},localhost", nnodes="2"), procs_per_node=8)
    message = str(error.value)
    assert UNRESOLVABLE in message and "MASTER_ADDR" in message


def test_unresolvable_nodeaddr_raises(tmp_path, monkeypatch):
    fake_scontrol(tmp_path, monkeypatch, ["localhost"], node_addr=UNRESOLVABLE)
    with pytest.raises(ClusterError) as error:
        detect(slurm_env(nodelist="localhost"), procs_per_node=8)
    assert UNRESOLVABLE in str(error.value) and "'localhost'" in str(error.value)


def test_unknown_node_in_scontrol_falls_back_to_the_host_name(tmp_path, monkeypatch):
    fake_scontrol(tmp_path, monkeypatch, ["localhost"], node_addr=None)
    assert detect(slurm_env(nodelist="localhost"), procs_per_node=2).master_addr == "localhost"


def test_second_host_is_not_consulted(no_scontrol):
    env = detect(slurm_env(nodelist=f"localhost,{UNRESOLVABLE}", nnodes="2", nodeid="1"), procs_per_node=2)
    assert env.master_addr == "localhost" and env.node_rank == 1


def test_step_variables_win_inside_an_srun_step(no_scontrol):
    env = detect(slurm_env(nodelist=f"{UNRESOLVABLE},localhost", nnodes="2", SLURM_STEP_ID="0",
                           SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1"), procs_per_node=2)
    assert env.nnodes == 1 and env.master_addr == "localhost" and env.nodelist == "localhost"


def test_job_id_without_nodelist(no_scontrol):
    with pytest.raises(ClusterError, match="SLURM_JOB_NODELIST is empty"):
        detect({"SLURM_JOB_ID": "5"}, procs_per_node=1)


# ----------------------------------------------------------------- standalone

def test_standalone_picks_a_free_local_port(no_scontrol):
    env = detect({}, procs_per_node=2)
    assert (env.mode, env.nnodes, env.node_rank, env.master_addr, env.job_id) == \
        ("standalone", 1, 0, "127.0.0.1", None)
    assert env.world_size == 2
    with socket.socket() as sock:  # it was free a moment ago: it can be bound now
        sock.bind(("127.0.0.1", env.master_port))


def test_standalone_honours_master_port():
    assert detect({"MASTER_PORT": "29555"}, procs_per_node=1).master_port == 29555


def test_node_address_of_a_resolvable_host_without_scontrol(no_scontrol):
    assert cluster.node_address("localhost") == "localhost"
    assert cluster.first_host("gpu[07-09],cpu1") == "gpu07"
