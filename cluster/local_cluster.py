"""A local multi-node Ray cluster on one machine: a head and worker nodes started with ``ray start``.

Each node is one ``ray start --block`` process in a session of its own, so a node is stopped (or
killed, to stand in for a lost machine) by signalling its own process tree and nothing else that
runs on the machine; ``ray stop`` would end every Ray instance here, other people's included.

    python -m cluster.local_cluster up [--config cluster/local-cluster.yaml] [--set key=value]
    python -m cluster.local_cluster status | down | kill-node node_b   [--state-dir DIR]

``cluster/local-up.sh`` and ``cluster/local-down.sh`` wrap ``up`` and ``down``. Tests use
:class:`LocalCluster` directly (``with LocalCluster(config) as cluster: ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil

from oppu.config import add_config_arguments, load_config
from oppu.errors import ConfigError, OppuError

DEFAULT_STATE_DIR = "/tmp/oppu-local-cluster"
DEFAULT_CONFIG = Path(__file__).with_name("local-cluster.yaml")

# Printed by `ray start --block` once its node has registered with the GCS.
_READY_MARKER = "This command will now block forever"
_RESOURCE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PORTS_PER_NODE = 200
_FIRST_WORKER_PORT_OFFSET = 100
# The raylet gives its dashboard agent a fixed 15 s to come up and aborts otherwise; on a busy
# machine the agent's imports take longer, so a starting node runs at raised priority (as root).
_STARTUP_NICENESS = -10
# Ray refuses object stores under 75 MiB.
_MIN_OBJECT_STORE_MIB = 80


class ClusterError(OppuError):
    """The local cluster could not be started, found or stopped."""


@dataclass
class LocalClusterConfig:
    """Shape of the local cluster. The defaults fit a head and two workers in 24 GB on 2 cores."""

    state_dir: str = DEFAULT_STATE_DIR
    """Holds cluster.json, the address file, node logs and Ray's temp dir of each node (``ray``
    for the head, ``ray-<worker>``; keep it short: Ray's socket paths live under it and must stay
    under 108 characters)."""
    gcs_port: int = 6390
    """The head's GCS port; the cluster address is ``<node ip>:<gcs_port>``."""
    dashboard_port: int = 8265
    """Ray dashboard and job/serve REST API, bound to 127.0.0.1."""
    port_base: int = 24000
    """Node i (head = 0) takes the ports [port_base + 200*i, port_base + 200*i + 199]: its
    raylet, object manager, metrics, agents, and 100 worker ports."""
    head_num_cpus: int = 0
    """Logical CPUs of the head; 0 keeps tasks and replicas on the workers, as in production."""
    worker_num_cpus: int = 1
    """Logical CPUs of each worker node."""
    workers: list[str] = field(default_factory=lambda: ["node_a", "node_b"])
    """One worker node per name; each carries a custom resource of that name (amount 1), so a
    task can be pinned to it with ``.options(resources={name: 0.01})``."""
    object_store_mib: int = 512
    """Object store cap of every node (shared memory), in MiB."""
    startup_timeout_s: float = 180.0
    """How long one node may take to register with the GCS."""
    start_attempts: int = 3
    """Starts of a node that exits during start-up before giving up."""
    stop_timeout_s: float = 30.0
    """How long a node may take to exit after SIGTERM before it is killed."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of every node, and so of every task, actor, job driver and serve
    replica on it (e.g. ``AWS_ENDPOINT_URL`` of the S3 server, ``PYTHONPATH``)."""
    auth: Literal["token", "disabled"] = "token"
    """Ray token authentication. ``token``: a fresh token in ``state_dir/auth_token`` (not the
    machine-wide ~/.ray/auth_token); every client needs :meth:`LocalCluster.client_env`."""

    def __post_init__(self) -> None:
        if self.object_store_mib < _MIN_OBJECT_STORE_MIB:
            raise ConfigError(f"object_store_mib: {self.object_store_mib} is below Ray's minimum "
                              f"({_MIN_OBJECT_STORE_MIB})")
        for name in self.workers:
            if not _RESOURCE_NAME.match(name):
                raise ConfigError(f"workers: {name!r} is not a valid resource name "
                                  "(letters, digits, _; not starting with a digit)")
        if len(set(self.workers)) != len(self.workers):
            raise ConfigError(f"workers: names must be unique, got {self.workers}")
        last_port = self.port_base + _PORTS_PER_NODE * (len(self.workers) + 1) - 1
        if self.port_base < 1024 or last_port > 65535:
            raise ConfigError(f"port_base: {self.port_base} puts node ports outside 1024..65535 "
                              f"(last port {last_port})")
        for key in ("gcs_port", "dashboard_port"):
            port = getattr(self, key)
            if self.port_base <= port <= last_port:
                raise ConfigError(f"{key}: {port} falls inside the node port range "
                                  f"{self.port_base}..{last_port}")
        if self.start_attempts < 1:
            raise ConfigError(f"start_attempts must be >= 1, got {self.start_attempts}")
        if self.head_num_cpus < 0 or self.worker_num_cpus < 1:
            raise ConfigError(f"head_num_cpus must be >= 0 and worker_num_cpus >= 1, got "
                              f"{self.head_num_cpus} and {self.worker_num_cpus}")


@dataclass(frozen=True)
class NodeProcess:
    """One node's ``ray start --block`` process; (pid, create_time) guards against pid reuse."""

    name: str
    pid: int
    create_time: float
    log_path: str

    def process(self) -> psutil.Process | None:
        """The live launcher process, or None once it has exited."""
        try:
            proc = psutil.Process(self.pid)
            if proc.create_time() != self.create_time or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.NoSuchProcess:
            return None

    def tree(self) -> list[psutil.Process]:
        """The launcher and every process it started (GCS, raylet, agents, core workers)."""
        proc = self.process()
        if proc is None:
            return []
        try:
            return [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


class LocalCluster:
    """Start, inspect, partly kill and stop a local multi-node Ray cluster."""

    def __init__(self, config: LocalClusterConfig):
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.nodes: list[NodeProcess] = []
        self.address: str | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.config.dashboard_port}"

    @property
    def state_path(self) -> Path:
        return self.state_dir / "cluster.json"

    @property
    def address_path(self) -> Path:
        return self.state_dir / "address"

    @property
    def token_path(self) -> Path:
        return self.state_dir / "auth_token"

    def client_env(self) -> dict[str, str]:
        """Environment a driver, ``ray job submit`` or ``serve deploy`` needs to reach the cluster.

        Ray only enables token auth by itself for a cluster it finds without an address, so an
        explicit address needs the mode spelled out.
        """
        if self.config.auth == "disabled":
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    @classmethod
    def attach(cls, state_dir: str | Path = DEFAULT_STATE_DIR) -> LocalCluster:
        """The cluster that ``up`` recorded under ``state_dir``."""
        state_path = Path(state_dir) / "cluster.json"
        try:
            state = json.loads(state_path.read_text())
        except FileNotFoundError as exc:
            raise ClusterError(f"no local cluster recorded in {state_path}; start one with "
                               "cluster/local-up.sh") from exc
        cluster = cls(LocalClusterConfig(**state["config"]))
        cluster.address = state["address"]
        cluster.nodes = [NodeProcess(**node) for node in state["nodes"]]
        return cluster

    def start(self) -> str:
        """Start the head, then each worker in turn; return the cluster (GCS) address."""
        if self.state_path.exists() and any(n.process() for n in LocalCluster.attach(self.state_dir).nodes):
            raise ClusterError(f"a local cluster recorded in {self.state_path} is still running; "
                               "stop it first (cluster/local-down.sh)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)
        if self.config.auth == "token":
            self.token_path.write_text(secrets.token_hex(32))
            self.token_path.chmod(0o600)
        try:
            self._start_node("head", self._head_args())
            self.address = (self._ray_temp_dir() / "ray_current_cluster").read_text().strip()
            self._write_state()
            for index, name in enumerate(self.config.workers, start=1):
                self._start_node(name, self._worker_args(index, name))
                self._write_state()
        except BaseException:
            self.stop()
            raise
        self.address_path.write_text(self.address + "\n")
        return self.address

    def stop(self) -> dict[str, str]:
        """SIGTERM each node (workers first, head last; in a node, its processes in ``ray stop``'s
        order), SIGKILL what outlives stop_timeout_s.

        Returns how each node ended, e.g. ``{"node_a": "exited in 1.2s", "head": "exited in 4.0s;
        killed after 30s: ['raylet']"}``.
        """
        ended = {}
        for node in reversed(self.nodes):
            ended[node.name] = self._end_node(node, graceful=True)
        self.nodes = []
        self.state_path.unlink(missing_ok=True)
        self.address_path.unlink(missing_ok=True)
        self.token_path.unlink(missing_ok=True)
        return ended

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of worker node ``name`` at once, as if its machine were lost."""
        if name == "head":
            raise ClusterError("kill_node: the head cannot be killed; use stop()")
        node = self._node(name)
        self._end_node(node, graceful=False)
        self.nodes = [n for n in self.nodes if n.name != name]
        self._write_state()

    def processes(self) -> list[psutil.Process]:
        """Every live process of every node."""
        return [proc for node in self.nodes for proc in node.tree()]

    def describe(self) -> dict:
        return {
            "address": self.address,
            "dashboard_url": self.dashboard_url,
            "client_env": self.client_env(),
            "nodes": {n.name: ("running" if n.process() else "exited") for n in self.nodes},
        }

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _node(self, name: str) -> NodeProcess:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ClusterError(f"no node named {name!r} in the local cluster; nodes: "
                           f"{[n.name for n in self.nodes]}")

    def _ray_temp_dir(self, node: str = "head") -> Path:
        """Ray's temp dir of ``node`` (sessions, sockets, logs, runtime envs): the head's ``ray``,
        each worker's ``ray-<name>``. One per node: nodes sharing one would share the unpacked
        working dirs of jobs too, and a worker setting up an actor's runtime env removes and
        unpacks again the directory a job driver on the head is running from (seen: the driver's
        ``import oppu.training.users_actor`` failed, the file gone for that moment)."""
        return self.state_dir / ("ray" if node == "head" else f"ray-{node}")

    def _node_ports(self, index: int) -> list[str]:
        first = self.config.port_base + _PORTS_PER_NODE * index
        return [
            f"--node-manager-port={first}",
            f"--object-manager-port={first + 1}",
            f"--metrics-export-port={first + 2}",
            f"--dashboard-agent-listen-port={first + 3}",
            f"--dashboard-agent-grpc-port={first + 4}",
            f"--runtime-env-agent-port={first + 5}",
            f"--min-worker-port={first + _FIRST_WORKER_PORT_OFFSET}",
            f"--max-worker-port={first + _PORTS_PER_NODE - 1}",
        ]

    def _common_args(self) -> list[str]:
        return [f"--object-store-memory={self.config.object_store_mib * 1024 * 1024}",
                "--disable-usage-stats", "--block"]

    def _head_args(self) -> list[str]:
        head_port_base = self.config.port_base
        return [
            "--head", f"--port={self.config.gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.config.dashboard_port}",
            f"--ray-client-server-port={head_port_base + 6}",
            f"--temp-dir={self._ray_temp_dir()}",
            f"--num-cpus={self.config.head_num_cpus}",
            *self._node_ports(0), *self._common_args(),
        ]

    def _worker_args(self, index: int, name: str) -> list[str]:
        return [
            f"--address={self.address}",
            f"--num-cpus={self.config.worker_num_cpus}",
            f"--resources={json.dumps({name: 1})}",
            f"--temp-dir={self._ray_temp_dir(name)}",
            *self._node_ports(index), *self._common_args(),
        ]

    def _start_node(self, name: str, args: list[str]) -> None:
        """Start one node and wait until it has joined; a node that dies while starting (on a
        loaded machine Ray's agents can miss the raylet's start-up deadline) is started again."""
        env = {key: value for key, value in os.environ.items() if key != "RAY_AUTH_TOKEN"}
        env.update(self.config.env)
        env.update(self.client_env())
        for attempt in range(1, self.config.start_attempts + 1):
            log_path = self.state_dir / "logs" / f"{name}.{attempt}.log"
            with log_path.open("w") as log:
                # A session of its own: Ray's reaper signals the launcher's process group on exit.
                popen = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", *args],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
            launcher = psutil.Process(popen.pid)
            node = NodeProcess(name, popen.pid, launcher.create_time(), str(log_path))
            self.nodes.append(node)
            _set_priority(launcher, _STARTUP_NICENESS)
            deadline = time.monotonic() + self.config.startup_timeout_s
            while _READY_MARKER not in log_path.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise ClusterError(f"node {name!r} did not join within "
                                       f"{self.config.startup_timeout_s:.0f}s; see {log_path}:\n"
                                       f"{_tail(log_path)}")
                if popen.poll() is not None:
                    break
                time.sleep(0.5)
            else:
                for proc in node.tree():  # core workers the raylet starts later inherit this
                    _set_priority(proc, 0)
                return
            self._end_node(node, graceful=False)
            self.nodes.remove(node)
        raise ClusterError(f"node {name!r} exited while starting, {self.config.start_attempts} times; "
                           f"last lines of {log_path}:\n{_tail(log_path)}")

    def _end_node(self, node: NodeProcess, *, graceful: bool) -> str:
        tree = node.tree()
        if not tree:
            return "already gone"
        started = time.monotonic()
        if graceful:
            alive = _terminate_in_order(tree, started + self.config.stop_timeout_s)
        else:
            alive = tree
        names = []
        for proc in alive:
            try:
                names.append(proc.name())
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        _, still_alive = psutil.wait_procs(alive, timeout=10)
        if still_alive:
            raise ClusterError(f"node {node.name!r}: processes {[p.pid for p in still_alive]} "
                               "survived SIGKILL")
        if not graceful:
            return f"killed: {len(tree)} processes"
        if alive:
            return f"killed after {self.config.stop_timeout_s:.0f}s: {sorted(names)}"
        return f"exited in {time.monotonic() - started:.1f}s"

    def _write_state(self) -> None:
        state = {
            "config": dataclasses.asdict(self.config),
            "address": self.address,
            "dashboard_url": self.dashboard_url,
            "nodes": [dataclasses.asdict(node) for node in self.nodes],
        }
        tmp_path = self.state_path.with_suffix(".tmp")
        tmp_path.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp_path, self.state_path)


def _terminate_in_order(tree: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """SIGTERM a node's processes group by group in the order ``ray stop`` uses, each group once
    the one before has exited (waiting until ``deadline`` at most): the launcher (``ray start
    --block``, which would otherwise watch its children die) and the raylet, then the agents,
    dashboard and workers, the GCS last. Returns those still alive at the deadline.

    A SIGTERM to the launcher alone ends the launcher only: the raylet and the GCS it started
    ran on until the SIGKILL, and ``local-down.sh`` took a minute (30 s a node).
    """
    def name(proc: psutil.Process) -> str:
        try:
            return proc.name()
        except psutil.NoSuchProcess:
            return ""

    launcher, rest = tree[0], tree[1:]
    groups = [[launcher, *[p for p in rest if name(p) == "raylet"]],
              [p for p in rest if name(p) not in ("raylet", "gcs_server")],
              [p for p in rest if name(p) == "gcs_server"]]
    for group in groups:
        for proc in group:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(group, timeout=max(0.0, deadline - time.monotonic()))
    _, alive = psutil.wait_procs(tree, timeout=0)
    return alive


def _set_priority(proc: psutil.Process, niceness: int) -> None:
    """Best effort: only root may raise a priority, and the process may already be gone."""
    try:
        proc.nice(niceness)
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        pass


def _tail(path: Path, n_lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n_lines:])


def _up(args: argparse.Namespace) -> int:
    config = load_config(LocalClusterConfig, args.config, args.overrides)
    cluster = LocalCluster(config)
    started = time.monotonic()
    address = cluster.start()
    print(f"local Ray cluster up in {time.monotonic() - started:.0f}s: head + {config.workers}")
    print(f"  cluster address : {address}   (also in {cluster.address_path})")
    print(f"  dashboard       : {cluster.dashboard_url}")
    print("Clients (ray job submit, serve deploy, drivers) need:")
    print(f"  export RAY_ADDRESS={cluster.dashboard_url} RAY_DASHBOARD_ADDRESS={cluster.dashboard_url}")
    for name, value in cluster.client_env().items():
        print(f"  export {name}={value}")
    return 0


def _down(args: argparse.Namespace) -> int:
    if not (Path(args.state_dir) / "cluster.json").exists():
        print(f"no local cluster recorded in {args.state_dir}; nothing to stop")
        return 0
    ended = LocalCluster.attach(args.state_dir).stop()
    print(f"local Ray cluster in {args.state_dir} stopped: "
          + ", ".join(f"{name} {how}" for name, how in ended.items()))
    return 0


def _status(args: argparse.Namespace) -> int:
    print(json.dumps(LocalCluster.attach(args.state_dir).describe(), indent=2))
    return 0


def _kill_node(args: argparse.Namespace) -> int:
    LocalCluster.attach(args.state_dir).kill_node(args.name)
    print(f"node {args.name!r} killed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local_cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start a head and the worker nodes")
    add_config_arguments(up)
    up.set_defaults(handler=_up)
    for name, handler, help_line in (("down", _down, "stop every node of the recorded cluster"),
                                     ("status", _status, "print address, dashboard and node states"),
                                     ("kill-node", _kill_node, "SIGKILL one worker node")):
        sub = commands.add_parser(name, help=help_line)
        sub.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
        if name == "kill-node":
            sub.add_argument("name", help="worker node name, e.g. node_b")
        sub.set_defaults(handler=handler)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, ClusterError) as exc:
        print(f"local_cluster {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
