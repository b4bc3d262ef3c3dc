"""Test hosts on one machine (issue 10): their own network, hostname and scratch disk.

Each host is a set of Linux namespaces held open by one long-lived "anchor"
process (``sleep infinity``):

- network: its own netns with one link, ``eth0``, on a private bridge that
  lives in a separate "switch" netns; addresses on ``10.213.N.0/24`` (N picked
  per running harness, so two harnesses on one machine never meet).  No host
  has a default route: nothing they send can leave the test subnet.
- UTS: its own hostname (``pc-w1`` ...), so ``socket.gethostname()`` differs.
- mount: a private tmpfs over ``/scratch`` (a file one host writes there is
  absent on every other host) and a private ``/etc/hosts`` naming the test
  hosts (``pc-sched`` / ``sched`` ...).  Everything else on the machine's disk
  stays visible, as on machines that share an installed software tree.

Every process of a host is started with ``nsenter --target <anchor>`` into
those three namespaces.  The test runner itself (the root netns) has address
``.1`` on the bridge, so a test can talk to the S3 server and the scheduler
directly, as an operator's laptop on the cluster network would.

Roles: ``storage`` (moto S3 server), ``sched`` (``dask scheduler``), ``w1``
and ``w2`` (``dask worker``, one process, one thread), ``client`` and
``client2`` (only the anchor: ``pagecube build`` runs there).

Python API::

    with Cluster.up() as c:                       # or the pytest fixtures below
        c.client.run([*PAGECUBE, "build", "s3://pages/s/pages.txt", "--out", "s3://cubes/a.zarr",
                      "--cluster", c.scheduler, "--storage-options", c.storage_options_json])
        c.w1.cut(); c.w1.restore(); c.w2.kill(); c.heal()

By hand (root)::

    python tests/testhosts.py up      # prints hosts, addresses, how to enter one
    python tests/testhosts.py down    # tears down every harness started by hand (or left by a dead run)

Pytest: the ``testhosts`` fixture (session) brings the cluster up once;
``hosts`` (function) heals it before each test (links up, dead services
respawned, both workers registered, client processes gone, the page log and
model control reset) and returns it.  Where namespaces cannot be made the tests
skip with the reason, unless ``PAGECUBE_REQUIRE_TEST_HOSTS=1`` (CI) turns that
skip into a failure.

``--model testhosts:logged_tiny`` is the tiny model plus a side channel through
``cluster.shared`` (a runner folder every host sees): ``page_log`` says which
host forwarded which page when, and ``set_model_control(delay=..., hold=...)``
slows or holds the workers' batches (per host with ``{host}`` in the hold path).

Limits: processes share one pid namespace (a pid is not per host); a killed
``storage`` host comes back with an empty S3 server (moto keeps data in memory).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PYTHON = sys.executable
PAGECUBE = [PYTHON, "-m", "pipeline.cli"]
DASK = [PYTHON, "-m", "dask"]

PREFIX = "pch"  # every netns and link this harness makes starts with it
REGISTRY = Path("/run/pagecube-testhosts")  # one small json per live harness (subnet, owner)
SCRATCH = "/scratch"
SUBNET = "10.213.{n}.0/24"
ROLES = {"storage": 10, "sched": 11, "w1": 21, "w2": 22, "client": 31, "client2": 32}
WORKERS = ("w1", "w2")
S3_PORT, SCHED_PORT, DASHBOARD_PORT = 9000, 8786, 8787
ACCESS_KEY = SECRET_KEY = "testing"
BUCKETS = ("pages", "cubes")
#: The scheduler drops a worker it has not heard from for this long (Dask's default is 300 s: a
#: build with a cut-off worker would stall that long).  Dask checks every TTL, so it notices
#: after TTL..2*TTL.
WORKER_TTL = os.environ.get("PAGECUBE_TEST_WORKER_TTL", "10s")
#: Dask drops a worker whose TCP connection has had unacknowledged data (or unanswered keepalives)
#: for ``distributed.comm.timeouts.tcp`` (default 30 s): measured, that, not worker-ttl, is what
#: notices a cut-off worker first.  12 s here (at least 11 s works) keeps the cut-link test short;
#: an empty PAGECUBE_TEST_COMM_TCP_TIMEOUT keeps Dask's default (the test then takes ~20 s more).
COMM_TCP_TIMEOUT = os.environ.get("PAGECUBE_TEST_COMM_TCP_TIMEOUT", "12s")
REQUIRE_ENV = "PAGECUBE_REQUIRE_TEST_HOSTS"
SHARED_ENV = "PAGECUBE_TESTHOSTS_SHARED"  # a folder of the runner every host sees (test side channel)
_PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy")


class Unavailable(RuntimeError):
    """Test hosts cannot be made here (the message says why)."""


def _sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def why_unavailable() -> str | None:
    """None when test hosts can be made here; otherwise the reason."""
    if not sys.platform.startswith("linux"):
        return "test hosts need Linux namespaces"
    if os.geteuid() != 0:
        return "test hosts need root (network, UTS and mount namespaces)"
    for tool in ("ip", "unshare", "nsenter", "mount", "sleep", "sh"):
        if shutil.which(tool) is None:
            return f"test hosts need `{tool}` (iproute2 / util-linux)"
    if _moto_server() is None:
        return "moto_server not installed (pip install 'moto[server]')"
    for mod in ("s3fs", "distributed"):
        try:
            __import__(mod)
        except ImportError:
            return f"test hosts need the Python package {mod}"
    try:
        os.makedirs(SCRATCH, exist_ok=True)  # the mount point; each host mounts its own tmpfs over it
    except OSError as exc:
        return f"cannot make the mount point {SCRATCH}: {exc}"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = _sh("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    try:  # hostname and a private tmpfs, as every host's anchor makes them
        inside = _sh("ip", "netns", "exec", probe, "unshare", "--uts", "--mount", "--propagation", "private",
                     "sh", "-c", f"hostname pc-probe && mount -t tmpfs pc-probe {SCRATCH}", check=False)
    finally:
        _sh("ip", "netns", "del", probe, check=False)
    if inside.returncode != 0:
        return f"cannot make UTS and mount namespaces: {inside.stderr.strip()}"
    return None


def _moto_server() -> str | None:
    return shutil.which("moto_server", path=os.pathsep.join([str(Path(PYTHON).parent), os.environ.get("PATH", "")]))


def _proc_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _pids_in_netns(inode: int) -> list[int]:
    """Every process whose network namespace is ``inode`` (a host's processes, children included)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                    out.append(int(entry))
            except OSError:
                continue
    return out


def _wait_port(ip: str, port: int, timeout: float, alive=lambda: True, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((ip, port), timeout=0.5).close()
            return
        except OSError:
            if not alive():
                raise RuntimeError(f"{what or f'{ip}:{port}'} exited before it listened")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what or f'{ip}:{port}'} did not listen within {timeout:.0f} s")
            time.sleep(0.1)


class Host:
    """One test host: its namespaces (held by an anchor process) and the processes started in them."""

    def __init__(self, cluster: "Cluster", role: str):
        self.cluster, self.name = cluster, role
        self.hostname = f"pc-{role}"
        self.ip = cluster.ip(ROLES[role])
        self.netns = f"{cluster.prefix}-{role}"
        self.anchor: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []
        self.service: subprocess.Popen | None = None  # the role's server process (moto, scheduler, worker)

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.hostname} {self.ip}{' CUT' if self.is_cut else ''}>"

    # --- namespaces ------------------------------------------------------------------------------
    def _make(self) -> None:
        c = self.cluster
        _sh("ip", "netns", "add", self.netns)
        _sh("ip", "link", "add", "eth0", "netns", self.netns, "type", "veth",
            "peer", "name", f"v-{self.name}", "netns", c.switch)
        _sh("ip", "-n", c.switch, "link", "set", "dev", f"v-{self.name}", "master", "br0")
        _sh("ip", "-n", c.switch, "link", "set", "dev", f"v-{self.name}", "up")
        _sh("ip", "-n", self.netns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        _sh("ip", "-n", self.netns, "link", "set", "dev", "eth0", "up")
        _sh("ip", "-n", self.netns, "link", "set", "dev", "lo", "up")
        self.start_anchor()

    def start_anchor(self) -> None:
        """The process that holds the host's UTS and mount namespaces (a fresh /scratch each time)."""
        setup = (f"set -e; hostname {self.hostname}; mount -t tmpfs -o size=256m,mode=1777 pc-scratch {SCRATCH}; "
                 f"mount --bind {self.cluster.hosts_file} /etc/hosts; exec sleep infinity")
        self.anchor = subprocess.Popen(["ip", "netns", "exec", self.netns, "unshare", "--uts", "--mount",
                                        "--propagation", "private", "sh", "-c", setup],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:  # `exec sleep` keeps the pid: once it runs `sleep`, the set-up is done
            if self.anchor.poll() is not None:
                raise RuntimeError(f"host {self.name}: set-up failed: {self.anchor.stderr.read().decode()}")
            try:
                if Path(f"/proc/{self.anchor.pid}/comm").read_text().strip() == "sleep":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"host {self.name}: anchor did not start")
            time.sleep(0.02)

    @property
    def anchor_alive(self) -> bool:
        return self.anchor is not None and self.anchor.poll() is None

    # --- processes -------------------------------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        return self.cluster.env(extra)

    def argv(self, cmd: list, cwd: str | os.PathLike = ROOT) -> list[str]:
        """``cmd`` wrapped to run on this host (its network, hostname and mounts)."""
        if not self.anchor_alive:
            raise RuntimeError(f"host {self.name} is down (its anchor process is gone)")
        return ["nsenter", "--target", str(self.anchor.pid), "--net", "--uts", "--mount",
                f"--wdns={cwd}", "--", *map(str, cmd)]

    def run(self, cmd: list, env: dict | None = None, timeout: float = 180, check: int | None = None,
            cwd: str | os.PathLike = ROOT, **kwargs) -> subprocess.CompletedProcess:
        """Run ``cmd`` on this host and wait (text output captured unless redirected)."""
        kwargs.setdefault("capture_output", "stdout" not in kwargs and "stderr" not in kwargs)
        kwargs.setdefault("text", True)
        p = subprocess.run(self.argv(cmd, cwd), env=self.env(env), timeout=timeout, **kwargs)
        if check is not None:
            assert p.returncode == check, (f"on {self.name}: exit {p.returncode} (expected {check}): {cmd}\n"
                                           f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
        return p

    def python(self, code: str, *args, **kwargs) -> subprocess.CompletedProcess:
        return self.run([PYTHON, "-c", code, *args], **kwargs)

    def popen(self, cmd: list, env: dict | None = None, log: str | None = None,
              cwd: str | os.PathLike = ROOT, **kwargs) -> subprocess.Popen:
        """Start ``cmd`` on this host; tracked (killed at teardown and by ``kill``).

        ``log=NAME`` sends stdout+stderr to ``<logs>/<host>-NAME.log`` (``self.log_path(NAME)``);
        otherwise pass ``stdout=``/``stderr=`` as for ``subprocess.Popen``.
        """
        if log is not None:
            with open(self.log_path(log), "ab") as fh:
                p = subprocess.Popen(self.argv(cmd, cwd), env=self.env(env), stdin=subprocess.DEVNULL,
                                     stdout=fh, stderr=subprocess.STDOUT, **kwargs)
        else:
            p = subprocess.Popen(self.argv(cmd, cwd), env=self.env(env), **kwargs)
        self.procs.append(p)
        return p

    def copy_in(self, src: str | os.PathLike, dst: str) -> None:
        """Copy a file or folder of the runner to ``dst`` on this host (e.g. under ``/scratch``)."""
        self.run(["mkdir", "-p", str(Path(dst).parent)], check=0)
        self.run(["cp", "-r", str(src), dst], check=0)

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists as this host sees it (its own ``/scratch``)."""
        return self.run(["test", "-e", path]).returncode == 0

    def log_path(self, name: str) -> Path:
        return self.cluster.logs / f"{self.name}-{name}.log"

    def pids(self) -> list[int]:
        """Every live process of this host but its anchor."""
        inode = _netns_inode(f"/run/netns/{self.netns}")
        if inode is None:
            return []
        anchor = self.anchor.pid if self.anchor is not None else None
        return [p for p in _pids_in_netns(inode) if p != anchor]

    def kill(self, anchor: bool = False) -> None:
        """SIGKILL every process of this host (with ``anchor=True`` the host itself goes: a fresh
        ``/scratch`` when it comes back with ``start_anchor``/``heal``)."""
        for _ in range(20):  # repeat: a process may fork while we kill
            pids = self.pids()
            if anchor and self.anchor_alive:
                pids.append(self.anchor.pid)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for p in self.procs + ([self.anchor] if anchor and self.anchor else []):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        self.procs = [p for p in self.procs if p.poll() is None]
        if self.service is not None and self.service.poll() is not None:
            self.service = None

    # --- the link --------------------------------------------------------------------------------
    def cut(self) -> None:
        """Link down on the host's side: its processes live on, but reach no other host."""
        _sh("ip", "-n", self.netns, "link", "set", "dev", "eth0", "down")

    def restore(self) -> None:
        _sh("ip", "-n", self.netns, "link", "set", "dev", "eth0", "up")

    @property
    def is_cut(self) -> bool:
        p = _sh("ip", "-n", self.netns, "-o", "link", "show", "dev", "eth0", check=False)
        flags = p.stdout.partition("<")[2].partition(">")[0].split(",")
        return p.returncode == 0 and "UP" not in flags

    # --- the role's service ----------------------------------------------------------------------
    def start_service(self) -> None:
        c = self.cluster
        if self.name == "storage":
            self.service = self.popen([_moto_server(), "-H", self.ip, "-p", S3_PORT], log="moto")
        elif self.name == "sched":
            self.service = self.popen([*DASK, "scheduler", "--host", self.ip, "--port", SCHED_PORT,
                                       "--dashboard-address", f"{self.ip}:{DASHBOARD_PORT}"],
                                      env={"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": c.worker_ttl,
                                           **({"DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": COMM_TCP_TIMEOUT}
                                              if COMM_TCP_TIMEOUT else {})},
                                      log="scheduler")
        elif self.name in WORKERS:
            self.service = self.popen([*DASK, "worker", f"tcp://pc-sched:{SCHED_PORT}", "--name", self.name,
                                       "--host", self.ip, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
                                      log="worker")

    def wait_service(self, timeout: float = 60) -> None:
        alive = lambda: self.service is not None and self.service.poll() is None  # noqa: E731
        if self.name == "storage":
            _wait_port(self.ip, S3_PORT, timeout, alive, "moto_server on storage")
        elif self.name == "sched":
            _wait_port(self.ip, SCHED_PORT, timeout, alive, "dask scheduler on sched")
            _wait_port(self.ip, DASHBOARD_PORT, timeout, alive, "the scheduler's dashboard")


class Cluster:
    """Six test hosts on one bridge: storage (S3), sched, w1, w2, client, client2."""

    def __init__(self, n: int, workdir: Path, worker_ttl: str = WORKER_TTL, owner: int | None = None,
                 own_workdir: bool = False):
        self.n, self.workdir, self.worker_ttl = n, Path(workdir), worker_ttl
        self.own_workdir = own_workdir  # made by the harness: removed by down()
        self.prefix = f"{PREFIX}-{n}"
        self.switch = f"{self.prefix}-sw"
        self.runner_link = f"{PREFIX}{n}"  # the runner's end, in the root netns
        self.runner_ip = self.ip(1)
        self.logs = self.workdir / "logs"
        self.shared = self.workdir / "shared"
        self.hosts_file = self.workdir / "hosts"
        self.owner = owner
        self.hosts = {role: Host(self, role) for role in ROLES}

    def __repr__(self) -> str:
        return f"<Cluster 10.213.{self.n}.0/24 {list(self.hosts.values())}>"

    # --- addresses -------------------------------------------------------------------------------
    def ip(self, last: int) -> str:
        return f"10.213.{self.n}.{last}"

    def __getattr__(self, role: str) -> Host:
        hosts = self.__dict__.get("hosts", {})
        if role in hosts:
            return hosts[role]
        raise AttributeError(role)

    def __getitem__(self, role: str) -> Host:
        return self.hosts[role]

    @property
    def endpoint(self) -> str:
        return f"http://{self.hosts['storage'].ip}:{S3_PORT}"

    @property
    def scheduler(self) -> str:
        """The address clients pass to ``--cluster`` (the scheduler host's IP)."""
        return f"tcp://{self.hosts['sched'].ip}:{SCHED_PORT}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.hosts['sched'].ip}:{DASHBOARD_PORT}"

    @property
    def storage_options(self) -> dict:
        """For ``--storage-options``: the S3 host's endpoint (keys come from each host's AWS_* env)."""
        return {"client_kwargs": {"endpoint_url": self.endpoint}}

    @property
    def storage_options_json(self) -> str:
        return json.dumps(self.storage_options)

    def env(self, extra: dict | None = None) -> dict:
        """The environment of every process on a test host: no proxies, no machine AWS settings,
        test credentials, the project and tests/ importable, workers without MALLOC_TRIM_THRESHOLD_."""
        env = {k: v for k, v in os.environ.items()
               if k.lower() not in _PROXY_VARS and not k.startswith(("AWS_", "PYTEST_"))}
        env.pop("MALLOC_TRIM_THRESHOLD_", None)
        env.update({
            "NO_PROXY": "*", "no_proxy": "*",
            "PATH": os.pathsep.join([str(Path(PYTHON).parent), env.get("PATH", "/usr/bin:/bin")]),
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
            "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
            "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": '{"MALLOC_TRIM_THRESHOLD_": None}',
            SHARED_ENV: str(self.shared),
        })
        env.update(extra or {})
        return env

    def fs(self):
        """An s3fs filesystem on the S3 host, from the runner."""
        import s3fs

        return s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, use_listings_cache=False,
                                 client_kwargs={"endpoint_url": self.endpoint},
                                 config_kwargs={"proxies": {}})

    # --- the scheduler's view --------------------------------------------------------------------
    def workers(self) -> dict[str, str]:
        """Registered workers, name -> address (from the dashboard's identity page)."""
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"{self.dashboard}/json/identity.json", timeout=5) as r:
            ident = json.load(r)
        return {str(w.get("name", a)): a for a, w in ident.get("workers", {}).items()}

    def wait_workers(self, names=WORKERS, timeout: float = 90, not_at: dict | None = None) -> dict[str, str]:
        """Wait until workers ``names`` are registered (a name in ``not_at``: at another address than
        that, i.e. the restarted worker, not its stale entry)."""
        not_at = not_at or {}
        deadline = time.monotonic() + timeout
        while True:
            try:
                have = self.workers()
                if all(n in have and have[n] != not_at.get(n) for n in names):
                    return have
            except OSError:
                have = {}
            for n in names:
                h = self.hosts[n]
                if h.service is None or h.service.poll() is not None:
                    raise RuntimeError(f"the dask worker on {n} exited:\n{_tail(h.log_path('worker'))}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {names} not all registered after {timeout:.0f} s (have {sorted(have)})")
            time.sleep(0.2)

    # --- life cycle ------------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def up(cls, workdir: Path | None = None, worker_ttl: str = WORKER_TTL):
        """Bring all six hosts and their services up; tear everything down on exit."""
        c = cls.create(workdir, worker_ttl, owner=os.getpid())
        try:
            c.start()
            yield c
        finally:
            c.down()

    @classmethod
    def create(cls, workdir: Path | None = None, worker_ttl: str = WORKER_TTL, owner: int | None = None):
        """Pick a free subnet, make the network and hosts (no services yet)."""
        reason = why_unavailable()
        if reason:
            raise Unavailable(reason)
        REGISTRY.mkdir(parents=True, exist_ok=True)
        with open(REGISTRY / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for stale in _stale_instances():
                stale.down()
            used = {int(p.stem) for p in REGISTRY.glob("*.json") if p.stem.isdigit()}
            routes = _sh("ip", "-4", "route", "show").stdout
            n = next((i for i in range(1, 255) if i not in used and f"10.213.{i}." not in routes), None)
            if n is None:
                raise Unavailable("no free 10.213.N.0/24 test subnet")
            own = workdir is None
            workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"pagecube-testhosts-{n}-"))
            c = cls(n, workdir, worker_ttl, owner, own)
            c._register()
        try:
            c._make_network()
        except BaseException:
            c.down()
            raise
        return c

    def _register(self) -> None:
        info = {"n": self.n, "workdir": str(self.workdir), "own_workdir": self.own_workdir, "owner": self.owner,
                "owner_start": _proc_start(self.owner) if self.owner else None, "worker_ttl": self.worker_ttl}
        (REGISTRY / f"{self.n}.json").write_text(json.dumps(info))

    def _make_network(self) -> None:
        for d in (self.logs, self.shared):
            d.mkdir(parents=True, exist_ok=True)
        names = [f"{self.ip(1)}\tpc-runner runner"] + [f"{h.ip}\t{h.hostname} {h.name}" for h in self.hosts.values()]
        self.hosts_file.write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n" + "\n".join(names) + "\n")
        _sh("ip", "netns", "add", self.switch)
        _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "dev", "br0", "up")
        _sh("ip", "link", "add", self.runner_link, "type", "veth", "peer", "name", "v-runner", "netns", self.switch)
        _sh("ip", "-n", self.switch, "link", "set", "dev", "v-runner", "master", "br0")
        _sh("ip", "-n", self.switch, "link", "set", "dev", "v-runner", "up")
        _sh("ip", "addr", "add", f"{self.runner_ip}/24", "dev", self.runner_link)
        _sh("ip", "link", "set", "dev", self.runner_link, "up")
        for h in self.hosts.values():
            h._make()

    def start(self, timeout: float = 120) -> "Cluster":
        """Start moto, the scheduler and both workers; make the buckets; wait until all are ready."""
        st, sc = self.hosts["storage"], self.hosts["sched"]
        st.start_service()
        sc.start_service()
        st.wait_service(timeout)
        self._buckets()
        sc.wait_service(timeout)
        for w in WORKERS:
            self.hosts[w].start_service()
        self.wait_workers(timeout=timeout)
        return self

    def _buckets(self) -> None:
        fs = self.fs()
        for b in BUCKETS:
            if not fs.exists(b):
                fs.mkdir(b)  # without a region (moto)

    def heal(self, timeout: float = 90) -> "Cluster":
        """Back to a whole cluster after a test cut or killed hosts: every host up with its link
        up, moto, the scheduler and both workers running, both workers registered."""
        for h in self.hosts.values():
            if not h.anchor_alive:
                h.kill()
                h.start_anchor()
            if h.is_cut:
                h.restore()
        st, sc = self.hosts["storage"], self.hosts["sched"]
        if st.service is None or st.service.poll() is not None:
            st.kill()
            st.start_service()
            st.wait_service(timeout)
            self._buckets()
        if sc.service is None or sc.service.poll() is not None:
            sc.kill()
            for w in WORKERS:  # workers of a lost scheduler: start them afresh
                self.hosts[w].kill()
            sc.start_service()
            sc.wait_service(timeout)
        try:
            have = self.workers()
        except OSError:
            have = {}
        restarted = {}
        for w in WORKERS:
            h = self.hosts[w]
            if w not in have or h.service is None or h.service.poll() is not None:
                if h.service is not None and h.service.poll() is None:
                    try:  # alive but not registered: it may be re-registering after a restored link
                        self.wait_workers((w,), timeout=20)
                        continue
                    except RuntimeError:
                        pass
                h.kill()
                h.start_service()
                restarted[w] = have.get(w)
        for h in self.hosts.values():  # leftovers of a test (builds on clients ...)
            if h.name in ("client", "client2"):
                h.kill()
        self.wait_workers(timeout=timeout, not_at=restarted)
        return self

    def down(self) -> None:
        """Remove everything: processes, namespaces (with their mounts), links, the registry entry."""
        for h in self.hosts.values():
            with contextlib.suppress(Exception):
                h.kill(anchor=True)
            # processes of this netns not started through us (a left-over from a dead harness)
            inode = _netns_inode(f"/run/netns/{h.netns}")
            if inode is not None:
                for pid in _pids_in_netns(inode):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            _sh("ip", "netns", "del", h.netns, check=False)
        _sh("ip", "netns", "del", self.switch, check=False)
        _sh("ip", "link", "del", "dev", self.runner_link, check=False)
        with contextlib.suppress(FileNotFoundError):
            (REGISTRY / f"{self.n}.json").unlink()
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def describe(self) -> str:
        lines = [f"test hosts on 10.213.{self.n}.0/24 (runner {self.runner_ip} on {self.runner_link}); "
                 f"work folder {self.workdir}"]
        for h in self.hosts.values():
            svc = {"storage": f"S3 {self.endpoint}", "sched": f"scheduler {self.scheduler}, dashboard {self.dashboard}",
                   "w1": "dask worker", "w2": "dask worker"}.get(h.name, "client")
            lines.append(f"  {h.name:8} {h.hostname:11} {h.ip:14} netns {h.netns:14} anchor pid "
                         f"{h.anchor.pid if h.anchor else '-':<8} {svc}")
        lines.append(f"enter one:  nsenter --target <anchor pid> --net --uts --mount bash")
        lines.append(f"--storage-options '{self.storage_options_json}'  (AWS keys: {ACCESS_KEY}/{SECRET_KEY})")
        return "\n".join(lines)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _stale_instances(include_manual: bool = False) -> list[Cluster]:
    """Harnesses whose owner process is gone (and, with ``include_manual``, those started by hand)."""
    out = []
    for p in REGISTRY.glob("*.json"):
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        owner = info.get("owner")
        dead = owner is not None and _proc_start(owner) != info.get("owner_start")
        if dead or (owner is None and include_manual):
            out.append(_adopt(info))
    return out


def _adopt(info: dict) -> Cluster:
    """A Cluster object for a harness made by another process (to tear it down)."""
    return Cluster(int(info["n"]), Path(info["workdir"]), info.get("worker_ttl", WORKER_TTL), info.get("owner"),
                   bool(info.get("own_workdir")))


# --- a model for tests on these hosts ------------------------------------------------------------
class _LoggedModel:
    """The tiny model, plus: every page forwarded is logged (time, hostname, pid, page id) to
    ``$PAGECUBE_TESTHOSTS_SHARED/pages.log``, and each batch waits ``delay`` seconds and while the
    file ``hold`` exists, both read from ``$PAGECUBE_TESTHOSTS_SHARED/model.json`` at every batch
    (so a test can slow, hold and release the workers' resident model)."""

    def __init__(self, inner):
        self._inner = inner
        self.info, self.device = inner.info, inner.device
        self.panel_side = inner.panel_side  # decoded as the inner model wants, so outputs equal its own builds
        self._dir = os.environ.get(SHARED_ENV, "")

    def _control(self) -> dict:
        try:
            return json.loads(Path(self._dir, "model.json").read_text())
        except (OSError, ValueError):
            return {}

    def prepare(self, page):
        return page.page_id, self._inner.prepare(page)

    def collate(self, prepared):
        return [pid for pid, _ in prepared], self._inner.collate([p for _, p in prepared])

    def forward(self, batch):
        ids, inner = batch
        control = self._control()
        if control.get("delay"):
            time.sleep(float(control["delay"]))
        host = socket.gethostname()
        task = _current_task()
        hold = lambda c: (c.get("hold") and os.path.exists(c["hold"].format(host=host))  # noqa: E731
                          and c.get("hold_key", "") in task)
        if hold(control):
            marker = Path(self._dir, f"holding-{host}")
            marker.touch()  # a test waits for this: the worker is inside a batch
            while hold(control):
                time.sleep(0.05)
                control = self._control()
            marker.unlink(missing_ok=True)
        out = self._inner.forward(inner)
        if self._dir:
            host, pid, now = socket.gethostname(), os.getpid(), time.time()
            with open(Path(self._dir, "pages.log"), "a") as fh:
                fh.write("".join(f"{now:.3f} {host} {pid} {page_id}\n" for page_id in ids))
        return out


def _current_task() -> str:
    """The key of the Dask task running this batch (it names the page range and the build's run id)."""
    try:
        from distributed import get_worker

        return str(get_worker().get_current_task() or "")
    except Exception:  # noqa: BLE001 - not on a worker
        return ""


def logged_tiny(**kwargs):
    """``--model testhosts:logged_tiny``: the tiny model, logged and slowed as ``model.json`` says."""
    from pipeline.model.tiny import build_tiny

    return _LoggedModel(build_tiny(**kwargs))


def set_model_control(cluster: Cluster, **control) -> None:
    """What ``logged_tiny`` does at its next batch: ``delay`` (seconds per batch), ``hold`` (a path;
    ``{host}`` in it becomes the worker's hostname: batches wait while it exists, and a waiting
    host shows as the file ``holding-<hostname>`` in ``cluster.shared``), ``hold_key`` (only batches
    of a task whose key contains it are held: one chunk, or one chunk of one run)."""
    tmp = cluster.shared / "model.json.tmp"
    tmp.write_text(json.dumps(control))
    tmp.replace(cluster.shared / "model.json")


def page_log(cluster: Cluster) -> list[tuple[float, str, int, str]]:
    """(time, hostname, pid, page id) for every page ``logged_tiny`` forwarded since ``clear_page_log``."""
    out = []
    path = cluster.shared / "pages.log"
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split(" ", 3)
            if len(parts) == 4:
                out.append((float(parts[0]), parts[1], int(parts[2]), parts[3]))
    return out


def clear_page_log(cluster: Cluster) -> None:
    with contextlib.suppress(FileNotFoundError):
        (cluster.shared / "pages.log").unlink()


# --- pytest fixtures -----------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # pragma: no cover - the script below runs without pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="session")
    def testhosts(tmp_path_factory):
        """The six test hosts with their services, once per session (skips where impossible)."""
        reason = why_unavailable()
        if reason:
            if os.environ.get(REQUIRE_ENV) == "1":
                pytest.fail(f"{REQUIRE_ENV}=1 but test hosts cannot be made: {reason}", pytrace=False)
            pytest.skip(reason)
        with Cluster.up(tmp_path_factory.mktemp("testhosts")) as c:
            yield c

    @pytest.fixture
    def hosts(testhosts):
        """The test hosts, healed before the test (links up, services running, both workers in)."""
        testhosts.heal()
        clear_page_log(testhosts)
        set_model_control(testhosts)
        yield testhosts


# --- by hand -------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "up":
        c = Cluster.create(owner=None)
        try:
            c.start()
        except BaseException:
            c.down()
            raise
        for h in c.hosts.values():  # services outlive this command
            h.procs.clear()
        print(c.describe())
        print(f"tear down with: {PYTHON} {Path(__file__).resolve()} down")
        return 0
    if cmd == "down":
        if not REGISTRY.exists():
            print("no test hosts")
            return 0
        with open(REGISTRY / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            gone = _stale_instances(include_manual=True)
            for c in gone:
                c.down()
        print(f"removed {len(gone)} test-host set(s)" + (f": 10.213.{', 10.213.'.join(str(c.n) for c in gone)}"
                                                         if gone else ""))
        return 0
    print("usage: testhosts.py up|down", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
