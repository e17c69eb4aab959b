"""A real multi-node Ray cluster on loopback, driven the way a user drives one.

`ray start --head` plus `ray start --address=...` (each node its own process tree, temp dir and resources),
token authentication on, and work submitted with the `ray job submit` CLI against the dashboard address.
The cluster is torn down by killing exactly the processes it started (never `ray stop`, which would take
down every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LoopbackCluster:
    """Head + worker nodes started with the `ray` CLI; everything it spawned is found by its temp dir."""

    root: Path
    node_cpus: tuple[int, ...]
    gcs_port: int = field(default_factory=_free_port)
    dashboard_port: int = field(default_factory=_free_port)
    started: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_path = self.root / "auth_token"
        # A cluster-private token, like `ray get-auth-token --generate` makes, so nothing depends on (or
        # overwrites) the user's ~/.ray/auth_token.
        self.token_path.write_text(secrets.token_hex(32))

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for every Ray process and client: token auth on, this venv's `python` first on PATH
        (the job entrypoint's `python` resolves through the raylet's PATH)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
            RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
            # `ray job stop` sends SIGTERM, then SIGKILL after this long (default 3 s): time for a clean stop on a
            # loaded CI machine.
            RAY_JOB_STOP_WAIT_TIME_S="120",
            # Train's controller polls as a private Ray's does (training.ray_session.PRIVATE_TRAIN_ENV): every
            # report waits for the next poll, and at Train's 2 s default these seconds-long runs spend most of their
            # time waiting. Set on the nodes, so the job's driver and its trials inherit it, as an operator would.
            RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1",
        )
        return env

    def _node_args(self, name: str, cpus: int) -> list[str]:
        temp_dir = self.root / name
        temp_dir.mkdir()
        self.started.append(temp_dir)
        # Fixed free ports for everything whose default is a fixed number: two nodes on one machine (and
        # other Rays on it) would otherwise collide.
        return [
            f"--temp-dir={temp_dir}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps({f'node_{name}': 1})}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            "--disable-usage-stats",
        ]

    def start(self) -> None:
        head = [
            RAY, "start", "--head", f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={_free_port()}", "--include-dashboard=true",
            *self._node_args("h", self.node_cpus[0]),
        ]  # fmt: skip
        self._run(head)
        for i, cpus in enumerate(self.node_cpus[1:]):
            worker = [RAY, "start", f"--address=127.0.0.1:{self.gcs_port}", *self._node_args(f"w{i}", cpus)]
            self._run(worker)
        self.wait_for_nodes(len(self.node_cpus))

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    def api(self, path: str, token: bool = True):
        """GET a dashboard endpoint; returns (status, parsed JSON or text)."""
        req = urllib.request.Request(self.dashboard_url + path)
        if token:
            req.add_header("Authorization", "Bearer " + self.token_path.read_text().strip())
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read().decode()
                status = r.status
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        try:
            return status, json.loads(body)
        except json.JSONDecodeError:
            return status, body

    def _state(self, kind: str) -> list[dict]:
        status, body = self.api(f"/api/v0/{kind}?limit=10000&detail=1")
        assert status == 200, (status, body)
        return body["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self._state("nodes") if n["state"] == "ALIVE"]

    def actors(self) -> list[dict]:
        return self._state("actors")

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.alive_nodes()
                if len(last) >= n:
                    return
            except (urllib.error.URLError, ConnectionError, AssertionError, KeyError) as e:
                last = e
            time.sleep(1)
        raise TimeoutError(f"cluster did not reach {n} alive nodes: {last}")

    def submit(self, working_dir: Path, entrypoint: list[str], timeout: float,
               wait: bool = True) -> subprocess.CompletedProcess:
        """`ray job submit` exactly as a user types it; blocks until the job ends (exit 1 if it failed), or with
        `wait=False` until it is submitted (the job id is in the output)."""
        cmd = [RAY, "job", "submit", "--address", self.dashboard_url, "--working-dir", ".",
               *([] if wait else ["--no-wait"]), "--", *entrypoint]
        return subprocess.run(
            cmd, cwd=working_dir, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def job(self, verb: str, job_id: str) -> subprocess.CompletedProcess:
        """`ray job stop | logs JOB_ID`."""
        cmd = [RAY, "job", verb, "--address", self.dashboard_url, job_id]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300)

    def processes(self) -> list[psutil.Process]:
        """Every process this cluster started: those naming one of its temp dirs, and their descendants
        (workers, agents, job drivers). The caller's own process and ancestors are never included."""
        spare = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        marks = [str(d) for d in self.started]
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmdline = p.info["cmdline"] or []
                if p.pid not in spare and any(m in a for a in cmdline for m in marks):
                    found[p.pid] = p
                    for c in p.children(recursive=True):
                        if c.pid not in spare:
                            found[c.pid] = c
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(found.values())

    def shutdown(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        # gcs_server can sit on SIGTERM for a long time; what is left after the grace period is killed.
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    c = LoopbackCluster(root=root, node_cpus=(2, 2))
    try:
        c.start()
        yield c
    finally:
        c.shutdown()
        leftover = c.processes()
        shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"cluster processes survived shutdown: {[p.pid for p in leftover]}"


SPREAD_SCRIPT = textwrap.dedent(
    """
    import json, ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init()  # RAY_ADDRESS is set by the job runner
    # STRICT_SPREAD cannot be satisfied on a single node: it proves the cluster really has two.
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    ray.get(pg.ready(), timeout=120)

    @ray.remote(num_cpus=1)
    def where():
        return ray.get_runtime_context().get_node_id()

    ids = ray.get([
        where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)).remote()
        for i in range(2)
    ])
    print("NODE_IDS=" + json.dumps(ids))
    """
)


@pytest.mark.slow
def test_cluster_requires_token(cluster):
    status, _ = cluster.api("/api/jobs/", token=False)
    assert status == 401
    status, _ = cluster.api("/api/jobs/", token=True)
    assert status == 200


@pytest.mark.slow
def test_trivial_job_runs_on_two_nodes(cluster, tmp_path):
    (tmp_path / "where.py").write_text(SPREAD_SCRIPT)
    proc = cluster.submit(tmp_path, ["python", "where.py"], timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "succeeded" in out, out[-5000:]
    line = next(l for l in out.splitlines() if "NODE_IDS=" in l)
    ids = json.loads(line.split("NODE_IDS=", 1)[1])
    alive = {n["node_id"] for n in cluster.alive_nodes()}
    assert len(set(ids)) == 2 and set(ids) <= alive, (ids, alive)


# Eight cells (2 budgets x 2 widths x r in {1, 2}): the fewest that identify the looped law's six coefficients, from
# four trained runs (wsd: each (width, r) trains to the larger budget, the smaller one a cooldown branch of it).
# Each trial holds 1.6 CPUs (a 0.1 trainable + one 1.5-CPU Train worker), so a 2-CPU node fits one trial at a
# time and `concurrency: auto` (4 CPUs / 1.6 = 2) runs two at once: they can only run on different nodes.
SWEEP_SPEC = textwrap.dedent(
    """
    name: e2e-cluster
    storage: results/e2e-cluster     # overridden by --storage, as on a real cluster
    data: default
    model: {family: tiny, vocab_size: 1024, seq_len: 128, head_dim: 16}
    budgets:
      - {compute: 5.0e10, widths: [32, 64]}
      - {compute: 1.0e11, widths: [32, 64]}
    r: [1, 2]
    variants: {baseline: {}}
    recipe:
      batch_tokens: 2048
      micro_batch: 16
      seed: 0
      eval_every: 10
      val_tokens: 4096
      spike_factor: 4.0
      max_failures: 1
      checkpoint_every: 50
      optim: {embed_lr_mult: 10.0, weight_decay: 0.0, beta1: 0.9, beta2: 0.95, grad_clip: 1.0, final_lr_frac: 0.1,
              schedule: wsd, cooldown_frac: 0.2}
    lr: {rule: fixed, value: 3.0e-3}
    resources: {num_workers: 1, cpus_per_worker: 1.5, gpus_per_worker: 0, zero_stage: 0, trial_cpus: 0.1}
    concurrency: auto
    fit: {bootstrap: 20, seed: 0}
    """
)
N_CELLS, N_TRAINED = 8, 4


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _checkout(tmp_path: Path) -> Path:
    """The user's checkout, uploaded as the job's working dir. A copy, so the test never writes into the
    repository; .rayignore and .gitignore travel with it and filter the upload as they would."""
    work = tmp_path / "checkout"
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info",
                                                              ".pytest_cache", "results", "runs"))
    return work


@pytest.mark.slow
def test_sweep_job_on_two_nodes(cluster, tmp_path):
    import math

    import pandas as pd

    from analysis import ScalingLaw

    import yaml

    from models.accounting import flops_per_token, param_counts
    from test_plugin_ray import user_project
    from tuning.grid import expand
    from tuning.spec import SweepSpec

    # The user's own loop, in their checkout (not under models/): the job's working dir carries it to every node.
    work = user_project(_checkout(tmp_path))
    spec = yaml.safe_load(SWEEP_SPEC)
    spec["model"].update(injection="userloops.gated:Gated", injection_args={"gate_init": 0.3})
    (work / "e2e-spec.yaml").write_text(yaml.safe_dump(spec))
    store = tmp_path / "store"  # one filesystem for all loopback nodes: a local path is shared storage here
    before = {a["actor_id"] for a in cluster.actors()}
    proc = cluster.submit(
        work, ["python", "tuning/sweep.py", "--config", "e2e-spec.yaml", "--storage", str(store)], timeout=1500
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-8000:]

    # Trials trained on more than one node: the Train workers this job created, by node.
    workers = [a for a in cluster.actors() if a["class_name"] == "RayTrainWorker" and a["actor_id"] not in before]
    nodes = {a["node_id"] for a in workers}
    assert len(workers) >= N_TRAINED and len(nodes) >= 2, [(a["node_id"][:8], a["state"]) for a in workers]

    # One row per cell, all trained to completion; the smaller budget's rows are branches of the larger one's runs.
    runs = pd.read_parquet(store / "runs")
    assert len(runs) == N_CELLS and runs["run_id"].is_unique, runs[["run_id", "status"]]
    assert set(runs["status"]) == {"completed"}, runs[["run_id", "status", "error"]]
    trained = runs[runs["parent_run_id"].isna()]
    assert len(trained) == N_TRAINED and set(runs["parent_run_id"].dropna()) == set(trained["run_id"])
    assert sorted(runs["r"].unique()) == [1, 2]
    # The plugin's exact parameters and FLOPs in every row (r = 1 has no loop, so no injection).
    sys.path.append(str(work))
    try:
        cells = {c.run_id: c for c in expand(SweepSpec.from_dict({**spec, "storage": str(store)}))}
    finally:
        sys.path.remove(str(work))
    assert set(runs["run_id"]) == set(cells)
    for row in runs.itertuples():
        model = cells[row.run_id].run.model
        assert (row.n_rec, row.flops_per_token) == (param_counts(model).n_rec, flops_per_token(model))
        assert row.injection == ("userloops.gated:Gated" if row.r > 1 else model.injection)

    # TensorBoard events per trained run, read back with TensorBoard's own reader.
    for run_id in trained["run_id"]:
        run_dir = store / "tensorboard" / run_id
        assert list(run_dir.glob("events.out.tfevents.*")), run_dir
        scalars = _scalars(run_dir)
        for tag in ("train/loss", "val/loss"):
            assert scalars.get(tag) and all(math.isfinite(v) for v in scalars[tag]), (run_id, tag, scalars.keys())

    # The fitted law, through the public loader.
    law = ScalingLaw.load(store / "law.json")
    assert law.n_runs == N_CELLS and law.phi is not None and math.isfinite(law.phi)


@pytest.mark.slow
def test_ray_job_stop_ends_the_sweep_leaving_no_trial_running(cluster, tmp_path):
    """`ray job stop` sends the driver SIGTERM (then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S): the sweep stops its
    Tune experiment, fails the LR search's running trial (queued again for the rerun) and says how to resume."""
    import optuna
    import yaml
    from optuna.trial import TrialState

    from optuna_file import trial_states

    spec = yaml.safe_load(SWEEP_SPEC)
    spec["lr"] = {"rule": "tuned", "search": {"trials": 1, "low": 1.0e-3, "high": 3.0e-2, "width": 32, "r": 1}}
    work = _checkout(tmp_path)
    (work / "stop-spec.yaml").write_text(yaml.safe_dump(spec))
    store = tmp_path / "store"
    proc = cluster.submit(work, ["python", "tuning/sweep.py", "--config", "stop-spec.yaml", "--storage", str(store)],
                          timeout=300, wait=False)
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", proc.stdout + proc.stderr).group(0)

    db = store / "optuna.db"

    deadline = time.monotonic() + 300
    while "RUNNING" not in [state for _, state in trial_states(db, f"{spec['name']}-lr")]:
        assert time.monotonic() < deadline, cluster.job("logs", job_id).stdout[-4000:]
        time.sleep(0.5)
    cluster.job("stop", job_id)  # returns once the job has ended
    status, info = cluster.api(f"/api/jobs/{job_id}")
    assert status == 200 and info["status"] == "STOPPED", info
    logs = cluster.job("logs", job_id).stdout
    assert "SIGTERM: stopping the sweep" in logs and "Traceback" not in logs, logs[-4000:]
    assert "interrupted: lr search 0 of 1 trials done, grid not started; rerun the same command to resume" in logs
    (interrupted, queued) = optuna.load_study(study_name=f"{spec['name']}-lr", storage=f"sqlite:///{db}").get_trials()
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["interrupted"], logs[-4000:]
    assert queued.state == TrialState.WAITING  # its LR, for the rerun
