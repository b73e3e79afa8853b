"""Run a SkyPilot task on this machine, the way SkyPilot runs it on a cluster.

Each attempt is a fresh "cluster": each node a new working directory with its own copy of the
workdir, `setup` then `run` on every node with the SKYPILOT_* variables SkyPilot sets. Buckets
become local directories (or stay URLs when a local S3/GCS endpoint is configured), so
state survives an attempt only through the bucket, as on a real spot node.

`job_recovery` is emulated: an attempt whose processes die by a signal was preempted and is
relaunched in a new directory ("another zone") with the same SKYPILOT_TASK_ID; a non-zero
exit of the task itself is retried up to `max_restarts_on_errors`, as managed jobs do.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch.jobs import Attempt, JobStatus, LocalJob
from vicuna_sky.localcloud.network import Host, Network
from vicuna_sky.ports import free_port
from vicuna_sky.procs import count_local_gpus, signal_name, signal_tree, started

if TYPE_CHECKING:
    import sky

# Never copied into an attempt's workdir: environments, caches, VCS data.
_WORKDIR_IGNORE = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs"}
_BUCKET_SCHEMES = ("s3://", "gs://", "r2://", "cos://", "oci://")


@dataclass
class LocalConfig:
    runs_dir: Path = Path("runs")
    """Each job gets `runs_dir/<name>-<timestamp>/` with its status, attempts and logs."""
    bucket_root: Path | None = None
    """Directory standing in for buckets; default `runs_dir/buckets` (shared across runs)."""
    s3_endpoint_url: str = ""
    """When set, s3:// URLs stay URLs and the task talks to this S3 server instead."""
    gcs_endpoint: str = ""
    """When set, gs:// URLs stay URLs and the task talks to this GCS emulator instead."""
    max_recoveries: int = 10
    """Preemptions recovered before the job is given up (SkyPilot's is unbounded)."""
    gpus_per_node: int | None = None
    """GPUs a local node has; None = count them with nvidia-smi."""
    network: Network | None = None
    """When set, each attempt's nodes are new hosts on it (their own addresses, only the
    task's ports open to other clusters), as a cloud's VMs are; else all run on loopback.
    The bucket endpoints above must then be reachable from the hosts (its gateway)."""

    def bucket_dir(self, url: str) -> Path:
        """The local directory standing in for a bucket URL (s3://b/p -> <root>/s3/b/p)."""
        if url.startswith(_BUCKET_SCHEMES):
            root = Path(self.bucket_root or Path(self.runs_dir) / "buckets").resolve()
            scheme, _, rest = url.partition("://")
            return root / scheme / rest.strip("/")
        return Path(url).expanduser().resolve()


class LocalRunner:
    """Runs one `sky.Task` locally with SkyPilot's environment and recovery semantics."""

    def __init__(
        self,
        task: sky.Task,
        config: LocalConfig | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.task = task
        self.config = config or LocalConfig()
        self.on_event = on_event or (lambda _msg: None)
        self._lock = threading.Lock()
        self._groups: list[subprocess.Popen] = []
        self._hosts: list[Host] = []
        self._preempting = False
        stamp = dt.datetime.now().strftime("%Y-%m-%d-%H-%M-%S-%f")
        name = task.name or "task"
        if Path(name).name != name or name in (".", ".."):
            # It names a directory under runs_dir: one path segment, or it escapes runs_dir.
            raise VicunaSkyError(f"task name {name!r} must be one path segment")
        self.cluster_name = f"local-{name}"
        run_dir = Path(self.config.runs_dir).resolve() / f"{name}-{stamp}"
        run_dir.mkdir(parents=True, exist_ok=False)
        # Same format as a managed job's id; it never changes across recoveries.
        task_id = f"sky-managed-{stamp}_{self.cluster_name}_1"
        self.job = LocalJob(name=name, task_id=task_id, run_dir=str(run_dir))
        self.job.pid, self.job.pid_started = os.getpid(), started(os.getpid())
        self.job.save()
        self._stop_reason = ""
        self._excluded: set[str] = set()
        """Absolute paths the workdir's .skyignore (else .gitignore) leaves out, as SkyPilot's
        upload to a cluster does."""
        root = self.config.bucket_root or Path(self.config.runs_dir) / "buckets"
        self.bucket_root = Path(root).resolve()
        self.job.metrics_url = self._metrics_url()
        self.job.save()

    # ------------------------------------------------------------------ public

    @property
    def run_dir(self) -> Path:
        return Path(self.job.run_dir)

    def running(self) -> bool:
        """Whether any process of the current attempt is still alive."""
        with self._lock:
            return any(p.poll() is None for p in self._groups)

    def preempt(self, grace_seconds: float = 0.0) -> bool:
        """Take the current "cluster" away, as a spot preemption does.

        With a grace period the processes get SIGTERM first (the cloud's notice), then
        SIGKILL. Returns False when nothing was running.
        """
        with self._lock:
            groups = [p for p in self._groups if p.poll() is None]
            if not groups:
                return False
            self._preempting = True
        if grace_seconds > 0:
            _signal_groups(groups, signal.SIGTERM)
            deadline = time.monotonic() + grace_seconds
            while time.monotonic() < deadline and any(p.poll() is None for p in groups):
                time.sleep(0.05)
        _signal_groups(groups, signal.SIGKILL)
        return True

    def stop(self, reason: str) -> bool:
        """End the job for good (CANCELLED, `reason`), not as a preemption to recover from."""
        self._stop_reason = reason
        return self.preempt(grace_seconds=0)

    def run(self) -> LocalJob:
        """Run to a final status: SUCCEEDED, FAILED, FAILED_SETUP or CANCELLED."""
        max_error_restarts = self._max_restarts_on_errors()
        try:
            while True:
                attempt = self._new_attempt()
                outcome = self._run_attempt(attempt)
                if self._stop_reason:
                    attempt.status = JobStatus.CANCELLED.value
                    self._set(JobStatus.CANCELLED, self._stop_reason)
                    break
                if outcome == "preempted":
                    self.job.recoveries += 1
                    if self.job.recoveries > self.config.max_recoveries:
                        self._set(JobStatus.FAILED, "too many preemptions")
                        break
                    self._set(JobStatus.RECOVERING, f"attempt {attempt.number} preempted")
                    continue
                # A failed setup counts like a failed run (0.14.1 jobs/controller.py:1346-1390:
                # both go through should_restart_on_failure).
                failed = outcome in ("failed", "failed_setup")
                if failed and self.job.restarts_on_errors < max_error_restarts:
                    self.job.restarts_on_errors += 1
                    self._set(JobStatus.RECOVERING, f"attempt {attempt.number} failed, restarting")
                    continue
                final = {
                    "succeeded": JobStatus.SUCCEEDED,
                    "failed": JobStatus.FAILED,
                    "failed_setup": JobStatus.FAILED_SETUP,
                }[outcome]
                self._set(final, f"attempt {attempt.number}: {attempt.reason or outcome}")
                break
        except BaseException as e:
            # Ctrl-C, the CLI's SIGTERM, or an error of ours: the "cluster" goes with us, so
            # no process of the job outlives the command that started it.
            self._kill_all()
            why = (
                self._stop_reason
                or ("stopped by user" if isinstance(e, KeyboardInterrupt) else "")
                or ("stopped (SIGTERM)" if type(e).__name__ == "Terminated" else "")
                or type(e).__name__
            )
            self._set(JobStatus.CANCELLED, why)
            raise
        return self.job

    # ----------------------------------------------------------------- attempts

    def _new_attempt(self) -> Attempt:
        number = len(self.job.attempts) + 1
        node_dir = self.run_dir / f"attempt-{number}"
        workdir = node_dir / "workdir"
        if self.task.workdir and isinstance(self.task.workdir, str):
            source = Path(self.task.workdir).expanduser().resolve()
            self._excluded = self._excluded or _sky_excluded(source)
            shutil.copytree(source, workdir, ignore=self._ignore, symlinks=True)
        else:
            workdir.mkdir(parents=True)
        for rank in range(1, self.task.num_nodes):
            # Each node has its own disk, with its own copy of the workdir (SkyPilot syncs it
            # to every node): what one node writes there, the others never see.
            shutil.copytree(workdir, node_workdir(workdir, rank), symlinks=True)
        attempt = Attempt(number=number, workdir=str(workdir), zone=f"local-zone-{number}")
        if self.config.network is not None:
            # A new cluster each attempt, as a recovery gets new VMs: new addresses too.
            self._hosts = self.config.network.add_cluster(self.task.num_nodes, self._ports())
            attempt.addresses = [h.address for h in self._hosts]
        self.job.attempts.append(attempt)
        status = JobStatus.STARTING if number == 1 else JobStatus.RECOVERING
        self._set(status, f"attempt {number} in {attempt.zone}, {workdir}")
        return attempt

    def _run_attempt(self, attempt: Attempt) -> str:
        attempt.started_at = time.time()
        try:
            return self._run_attempt_processes(attempt)
        finally:
            attempt.ended_at = time.time()
            if self.config.network is not None:
                # The cluster goes away with its attempt, and whatever still ran on it.
                self.config.network.remove(self._hosts)
            self.job.save()

    def _run_attempt_processes(self, attempt: Attempt) -> str:
        self._preempting = False
        node_dir = Path(attempt.workdir).parent
        envs = self._task_envs(attempt)
        nodes = range(self.task.num_nodes)
        if self.task.setup:
            # On every node, as SkyPilot runs a job's setup (0.14.1 backends/task_codegen.py:
            # 477-538: one setup per node, the first failure cancels the others, and the codes
            # are the job's exit codes, FAILED_SETUP).
            procs = [
                self._spawn(
                    self.task.setup,
                    {
                        **envs,
                        **self._node_envs(attempt, rank=rank, prefix="SKYPILOT_"),
                        **self._node_envs(attempt, rank=rank, prefix="SKYPILOT_SETUP_"),
                    },
                    node_workdir(Path(attempt.workdir), rank),
                    node_dir / f"setup-rank{rank}.log",
                    self._host(rank),
                )
                for rank in nodes
            ]
            outcome = self._outcome(attempt, self._wait_cluster(procs), "setup")
            if outcome != "succeeded":
                return outcome
        if not self.task.run:
            attempt.status = JobStatus.SUCCEEDED.value
            return "succeeded"
        self._set(JobStatus.RUNNING, f"attempt {attempt.number} running")
        procs = [
            self._spawn(
                self.task.run,
                {**envs, **self._node_envs(attempt, rank=rank, prefix="SKYPILOT_")},
                node_workdir(Path(attempt.workdir), rank),
                node_dir / f"run-rank{rank}.log",
                self._host(rank),
            )
            for rank in nodes
        ]
        return self._outcome(attempt, self._wait_cluster(procs), "run")

    def _outcome(self, attempt: Attempt, codes: list[int], stage: str) -> str:
        """What the nodes' exit codes of `stage` (setup or run) make of the attempt, by the
        rules of SkyPilot's jobs controller."""
        attempt.exit_codes = codes
        if self._preempting or any(c < 0 for c in codes):
            dead = [f"rank {r} by {signal_name(-c)}" for r, c in enumerate(codes) if c < 0]
            attempt.status = "PREEMPTED"
            attempt.reason = "killed: " + ", ".join(dead) if dead else f"preempted during {stage}"
            return "preempted"
        recover = [c for c in codes if c in self._recover_on_exit_codes()]
        if recover:
            # As SkyPilot (0.14.1 jobs/recovery_strategy.py:1356-1362): any node's code in
            # recover_on_exit_codes recovers, whatever max_restarts_on_errors says.
            attempt.status = "PREEMPTED"
            attempt.reason = f"{stage} exit code(s) {recover} matched recover_on_exit_codes"
            return "preempted"
        if any(codes):
            failed = JobStatus.FAILED_SETUP if stage == "setup" else JobStatus.FAILED
            attempt.status, attempt.reason = failed.value, f"{stage} exit codes {codes}"
            return "failed_setup" if stage == "setup" else "failed"
        attempt.status = JobStatus.SUCCEEDED.value
        return "succeeded"

    def _wait_cluster(self, procs: list[subprocess.Popen]) -> list[int]:
        """Every node's exit code. A node killed by a signal is a preemption: the others go
        with it. The first node to fail cancels the others, whose code is then 137 (0.14.1
        backends/task_codegen.py:387-400: ray.cancel(force=True), recorded as 128 + 9)."""
        cancelled: set[int] = set()
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return [CANCELLED if i in cancelled else int(c) for i, c in enumerate(codes)]
            ours = [c for i, c in enumerate(codes) if i not in cancelled and c is not None]
            if any(c < 0 for c in ours):
                # A preempted node is gone, and a multi-node job cannot continue without it.
                self._preempting = True
                _signal_groups([p for p in procs if p.poll() is None], signal.SIGKILL)
            elif any(c > 0 for c in ours):
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        cancelled.add(i)
                        signal_tree(p.pid, signal.SIGKILL)
            time.sleep(0.1)

    # -------------------------------------------------------------- environment

    def _task_envs(self, attempt: Attempt) -> dict[str, str]:
        """The task's envs and secrets, with bucket mounts pointed at local storage."""
        import sky.task as task_lib

        envs = dict(task_lib.get_plaintext_envs_and_secrets(self.task.envs_and_secrets))
        mounts = self._mounts()
        for key, value in list(envs.items()):
            envs[key] = self._localize(value, mounts)
        if "MASTER_PORT" in envs and self.config.network is None:
            # Concurrent local runs must not fight over the spec's fixed rendezvous port (on
            # hosts of their own, each cluster has its ports to itself).
            envs["MASTER_PORT"] = str(free_port())
        endpoints: dict[str, str] = {}
        if self.config.s3_endpoint_url:
            endpoints["AWS_ENDPOINT_URL_S3"] = self.config.s3_endpoint_url
            endpoints["AWS_ENDPOINT_URL"] = self.config.s3_endpoint_url
        if self.config.gcs_endpoint:
            endpoints["STORAGE_EMULATOR_HOST"] = self.config.gcs_endpoint
        python_bin = str(Path(sys.executable).parent)
        path = f"{python_bin}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "PATH": path, **endpoints, **envs}

    def _node_envs(self, attempt: Attempt, rank: int, prefix: str) -> dict[str, str]:
        n = self.task.num_nodes
        info = {
            "cluster_name": self.cluster_name,
            "cloud": "Local",
            "region": "local",
            "zone": attempt.zone,
        }
        return {
            f"{prefix}NODE_RANK": str(rank),
            f"{prefix}NODE_IPS": "\n".join(attempt.addresses or ["127.0.0.1"] * n),
            f"{prefix}NUM_NODES": str(n),
            f"{prefix}NUM_GPUS_PER_NODE": str(self._gpus_per_node()),
            "SKYPILOT_TASK_ID": self.job.task_id,
            "SKYPILOT_CLUSTER_INFO": json.dumps(info),
            "SKYPILOT_USER": getpass.getuser(),
        }

    def _mounts(self) -> dict[str, tuple[str, str]]:
        """mount path -> (bucket URL or local source, local directory standing in for it)."""
        out: dict[str, tuple[str, str]] = {}
        for dst, storage in (self.task.storage_mounts or {}).items():
            source = storage.source if isinstance(storage.source, str) else None
            url = source or f"s3://{storage.name}"
            out[dst] = (url, str(self._bucket_dir(url)))
        for dst, src in (self.task.file_mounts or {}).items():
            out[dst] = (src, str(self._bucket_dir(src)))
        for _url, local in out.values():
            Path(local).mkdir(parents=True, exist_ok=True)
        return out

    def _metrics_url(self) -> str:
        """Where sky/train.yaml's trainer keeps checkpoints and metrics, as reached from here;
        empty for a task that is no training run."""
        envs = self.task.envs
        if not all(k in envs for k in ("BUCKET_URL", "RUN_NAME", "RUN_TAG")):
            return ""
        url = f"{envs['BUCKET_URL'].rstrip('/')}/runs/{envs['RUN_NAME']}/{envs['RUN_TAG']}"
        return self._localize(url, self._mounts())

    def _bucket_dir(self, url: str) -> Path:
        return self.config.bucket_dir(url)

    def _localize(self, value: str, mounts: dict[str, tuple[str, str]]) -> str:
        for dst, (url, local) in mounts.items():
            for prefix, replacement in ((dst, local), (url, self._url_for(url, local))):
                if value == prefix or value.startswith(prefix.rstrip("/") + "/"):
                    return replacement + value[len(prefix) :]
        return value

    def _url_for(self, url: str, local: str) -> str:
        """A bucket URL as the local task should use it."""
        if url.startswith("s3://") and self.config.s3_endpoint_url:
            return url
        if url.startswith("gs://") and self.config.gcs_endpoint:
            return url
        return f"file://{local}" if url.startswith(_BUCKET_SCHEMES) else local

    def _gpus_per_node(self) -> int:
        requested = 0
        for res in self.task.resources:
            if res.accelerators:
                requested = int(max(res.accelerators.values()))
        available = self.config.gpus_per_node
        if available is None:
            available = count_local_gpus()
        return min(requested, available)

    def _recover_on_exit_codes(self) -> set[int]:
        codes: set[int] = set()
        for res in self.task.resources:
            recovery = res.job_recovery or {}
            if isinstance(recovery, dict):
                codes |= {int(c) for c in recovery.get("recover_on_exit_codes") or []}
        return codes

    def _max_restarts_on_errors(self) -> int:
        for res in self.task.resources:
            recovery = res.job_recovery or {}
            if isinstance(recovery, dict) and recovery.get("max_restarts_on_errors"):
                return int(recovery["max_restarts_on_errors"])
        return 0

    # ---------------------------------------------------------------- processes

    def _host(self, rank: int) -> Host | None:
        return self._hosts[rank] if self._hosts else None

    def _ports(self) -> list[str]:
        """The ports the task opens to other clusters (`resources.ports`)."""
        ports: set[str] = set()
        for res in self.task.resources:
            ports |= {str(p) for p in res.ports or []}
        return sorted(ports)

    def _spawn(
        self, script: str, env: dict[str, str], cwd: Path, log: Path, host: Host | None = None
    ) -> subprocess.Popen:
        argv = ["bash", "-c", script]
        with open(log, "ab") as out:
            # Its own session: the whole process tree of a node can be killed at once.
            proc = subprocess.Popen(
                host.command(argv) if host else argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        with self._lock:
            self._groups.append(proc)
            stopping = bool(self._stop_reason)
        if stopping:  # stopped while this was being started: it must not outlive the stop
            signal_tree(proc.pid, signal.SIGKILL)
        return proc

    def _kill_all(self) -> None:
        with self._lock:
            groups = [p for p in self._groups if p.poll() is None]
        _signal_groups(groups, signal.SIGKILL)
        for p in groups:
            p.wait()

    def _ignore(self, directory: str, names: list[str]) -> set[str]:
        runs = Path(self.config.runs_dir).resolve()
        skip = {n for n in names if n in _WORKDIR_IGNORE or n.endswith(".egg-info")}
        skip |= {n for n in names if (Path(directory) / n).resolve() == runs}
        skip |= {n for n in names if str((Path(directory) / n).resolve()) in self._excluded}
        return skip

    def _set(self, status: JobStatus, message: str) -> None:
        self.job.status = status.value
        self.job.save()
        with open(self.run_dir / "events.log", "a") as f:
            f.write(f"{dt.datetime.now().isoformat(timespec='seconds')} {status.value} {message}\n")
        if message:
            self.on_event(f"{status.value}: {message}")


# ------------------------------------------------------------------- helpers


CANCELLED = 137
"""The exit code SkyPilot records for a node cancelled because another failed (128 + SIGKILL)."""


def node_workdir(workdir: Path, rank: int) -> Path:
    """Node `rank`'s copy of an attempt's workdir: node 0's is the attempt's own."""
    return workdir if rank == 0 else workdir.parent / f"node-{rank}" / "workdir"


def _signal_groups(procs: list[subprocess.Popen], sig: signal.Signals) -> None:
    for p in procs:
        signal_tree(p.pid, sig)


def _sky_excluded(source: Path) -> set[str]:
    """What SkyPilot leaves out of `source` when it uploads a workdir: its own reading of
    .skyignore, or of .gitignore when there is none."""
    from sky.data import storage_utils

    try:
        relative = storage_utils.get_excluded_files(str(source))
    except Exception:  # SkyPilot's reading failed: copy as before rather than fail the run
        return set()
    return {str((source / r.rstrip("/")).resolve()) for r in relative}
