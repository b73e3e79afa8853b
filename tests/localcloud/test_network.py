"""The local cloud's hosts: each cluster node a network namespace on a bridge of the test's own
(198.18.0.0/15, no route off it), reachable from other clusters only on its declared ports.
The fleet runs across them as on a cloud, and a capture of the bridge shows what crosses it."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import textwrap
import time
from pathlib import Path

import httpx
import openai
import pytest

from vicuna_sky.launch.tasks import Spec, load_task
from vicuna_sky.localcloud.cluster import LocalConfig, LocalRunner
from vicuna_sky.localcloud.fleet import LocalSkyFleet
from vicuna_sky.localcloud.network import Network, unavailable_reason
from vicuna_sky.models import resolve_model_path
from vicuna_sky.recipe import Recipe
from vicuna_sky.serve.tls import trusting

ROOT = Path(__file__).resolve().parents[2]

LISTEN = "import socket,sys; s=socket.socket(); s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen()"


@pytest.fixture
def network():
    reason = unavailable_reason()
    if reason == "network namespaces need root":
        pytest.skip(reason)
    assert not reason, f"{reason}: `make env` installs it"
    with Network.make() as net:
        yield net
    gone = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{net.bridge}-" not in gone


def _send(host, address: str, port: int, text: str, timeout: float = 3) -> bool:
    """Whether `host` could open a connection to address:port and write `text`."""
    script = f"echo {text} > /dev/tcp/{address}/{port}"
    done = subprocess.run(
        host.command(["timeout", str(timeout), "bash", "-c", script]), capture_output=True
    )
    return done.returncode == 0


def test_a_cluster_is_reached_by_others_only_on_its_declared_ports(network):
    cluster = network.add_cluster(2, ["8001"])
    (other,) = network.add_cluster(1, [])
    head = cluster[0]
    servers = [
        subprocess.Popen(
            head.command(["python3", "-c", LISTEN + "; input()", str(port)]), stdin=subprocess.PIPE
        )
        for port in (8001, 9000)
    ]
    try:
        deadline = time.monotonic() + 60
        while not _send(cluster[1], head.address, 8001, "up", timeout=1):
            assert time.monotonic() < deadline, "the listener did not start"
        assert _send(other, head.address, 8001, "declared")  # resources.ports: open to all
        assert not _send(other, head.address, 9000, "undeclared")  # dropped
        assert _send(cluster[1], head.address, 9000, "peer")  # a node of its own cluster
        # Nothing leaves the bridge: no route to any other address (no packet is sent).
        route = subprocess.run(
            other.command(["ip", "route", "get", "192.0.2.1"]), capture_output=True, text=True
        )
        assert route.returncode != 0 and "unreachable" in route.stderr
        assert len({h.address for h in [*cluster, other]}) == 3
    finally:
        for server in servers:
            server.kill()
    network.remove(cluster)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert head.namespace not in listed  # the VM is gone, and its processes with it
    assert all(s.wait(5) is not None for s in servers)


def test_a_multi_node_run_gets_hosts_of_its_own_and_a_recovery_new_ones(network, tmp_path):
    """Each node of an attempt is its own host, SKYPILOT_NODE_IPS holds their addresses, the
    nodes reach each other on an undeclared port, and the recovered attempt is on new hosts.
    Node 0 ends the first attempt (75) once it has heard node 1: node 1 may be cancelled then
    (137) before it writes, as SkyPilot cancels the other nodes of a failed one."""
    import sky

    workdir = tmp_path / "project"
    workdir.mkdir()
    run = textwrap.dedent(
        """\
        set -e
        head=$(echo "$SKYPILOT_NODE_IPS" | head -1)
        mine=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
        if [ "$SKYPILOT_NODE_RANK" = 0 ]; then
          python3 -c "import socket; s=socket.socket(); s.bind(('0.0.0.0', 29500)); s.listen();
        c, a = s.accept(); print('from', a[0], c.recv(64).decode().strip())"
        else
          for i in $(seq 600); do
            (echo hello > /dev/tcp/$head/29500) 2>/dev/null && break; sleep 0.1
          done
        fi
        echo "rank $SKYPILOT_NODE_RANK on $mine" >> "$BUCKET/nodes"
        if [ "$SKYPILOT_NODE_RANK" = 0 ] && [ ! -e "$BUCKET/recovered" ]; then
          touch "$BUCKET/recovered"; exit 75
        fi
        """
    )
    task = sky.Task(name="hosts", run=run, workdir=str(workdir), num_nodes=2)
    task.set_resources(sky.Resources(job_recovery={"recover_on_exit_codes": [75]}))
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    task.update_envs({"BUCKET": str(bucket)})
    job = LocalRunner(task, LocalConfig(runs_dir=tmp_path / "runs", network=network)).run()
    assert job.status == "SUCCEEDED", job.attempts
    first, second = (a.addresses for a in job.attempts)
    assert len(set(first)) == 2 and not set(first) & set(second)
    lines = (bucket / "nodes").read_text().splitlines()
    assert f"rank 0 on {first[0]}" in lines
    assert {f"rank 0 on {second[0]}", f"rank 1 on {second[1]}"} <= set(lines)
    head_log = (Path(job.attempts[0].workdir).parent / "run-rank0.log").read_text()
    assert f"from {first[1]} hello" in head_log  # node 1 reached node 0 on a closed port


def test_the_fleet_across_hosts_sends_no_secret_key_or_prompt_in_clear(
    network, tmp_path, monkeypatch
):
    """sky/serve-controller.yaml and sky/serve-worker.yaml on hosts of their own, with the
    specs' ports and bind addresses: the client port is HTTPS with the fleet's certificate, the
    workers register on the fleet port, a preempted worker comes back on a new address, and a
    capture of everything on the bridge holds no fleet secret, API key, prompt or answer."""
    for key in ("VICUNA_SKY_API_KEYS", "VICUNA_SKY_FLEET_SECRET", "VICUNA_SKY_UI_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    model = resolve_model_path("tiny-llama", tmp_path / "models")
    recipe = Recipe.from_yaml(ROOT / "recipes" / "tiny-cpu.yaml")
    controller = load_task(Spec.CONTROLLER, recipe)
    api_key = "sk-" + secrets.token_hex(16)
    controller.update_secrets({"VICUNA_SKY_API_KEYS": api_key})
    worker = load_task(
        Spec.WORKER,
        recipe,
        {"CONTROLLER_URL": "https://CONTROLLER:8002", "SERVE_MODEL_PATH": model},
    )
    config = LocalConfig(
        runs_dir=tmp_path / "runs", bucket_root=tmp_path / "buckets", network=network
    )
    prompt = "Please remember the passphrase " + secrets.token_hex(12)
    canary = "CANARY" + secrets.token_hex(8)
    with (
        network.capture() as capture,
        LocalSkyFleet(controller, worker, "hosts", 2, config) as fleet,
    ):
        fleet.start(timeout=300)
        assert fleet.url.startswith(f"https://{network.gateway.rsplit('.', 1)[0]}.")
        assert fleet.port == 8000 and fleet.fleet_port == 8002  # the spec's own ports
        client = openai.OpenAI(
            base_url=f"{fleet.url}/v1",
            api_key=api_key,
            http_client=httpx.Client(verify=trusting(fleet.pem)),
        )

        def ask() -> str:
            answer = client.chat.completions.create(
                model=recipe.serve.model_name,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=16,
            )
            return answer.choices[0].message.content

        answers = [ask() for _ in range(4)]
        addresses = {w["address"] for w in fleet.registered()}
        assert len(addresses) == 2 and all(network.gateway[:-1] in a for a in addresses)
        victim = fleet.workers[0].runner
        assert victim.preempt(grace_seconds=0)
        deadline = time.monotonic() + 300

        def routed() -> set[str]:
            return {w["address"] for w in fleet.registered() or [] if w.get("available")}

        while not routed() - addresses:  # the relaunched worker announces its new host
            assert time.monotonic() < deadline, "the preempted worker did not come back"
            time.sleep(0.5)
        new = victim.job.attempts[-1].addresses[0]
        assert routed() - addresses == {f"https://{new}:8001"}
        answers += [ask() for _ in range(4)]
        # The capture's own check: what is sent in clear across the bridge is seen.
        controller_host = fleet.controller.runner._hosts[0]
        assert _send(controller_host, victim.job.attempts[-1].addresses[0], 8001, canary)
        time.sleep(0.5)
    crossed = b"\n".join(capture.streams().values())
    assert canary.encode() in crossed
    ports = {flow[3] for flow in capture.streams()}
    assert {8000, 8001, 8002} <= ports  # clients, the hop to the workers, registrations
    for what, value in [
        ("the fleet secret", fleet.secret),
        ("the API key", api_key),
        ("the prompt", prompt),
        *[("an answer", a) for a in answers if len(a) >= 12],
    ]:
        assert value.encode() not in crossed, f"{what} crossed the bridge in clear"


def test_hosts_are_for_the_local_backend_and_fall_back_to_loopback_in_one_line(
    tmp_path, monkeypatch, capsys
):
    import sys

    from vicuna_sky.localcloud import network as network_module
    from vicuna_sky.localcloud.backend import LocalBackend

    exe = str(Path(sys.executable).parent / "vicuna-sky")
    recipe = str(ROOT / "recipes" / "tiny-cpu.yaml")
    done = subprocess.run([exe, "train", recipe, "--hosts"], capture_output=True, text=True)
    assert done.returncode == 2 and "--hosts is for the local backend: add --local" in done.stderr
    monkeypatch.setattr(
        network_module, "unavailable_reason", lambda: "network namespaces need root"
    )
    backend = LocalBackend(tmp_path / "runs", hosts=True)
    with backend._network():
        assert backend.config.network is None
    said = capsys.readouterr().out.strip().splitlines()
    assert said == ["the local cloud runs on loopback: network namespaces need root"]


def test_a_fleet_on_hosts_without_an_api_key_is_refused_in_one_line(network, tmp_path, monkeypatch):
    from vicuna_sky.errors import VicunaSkyError
    from vicuna_sky.localcloud.backend import run_fleet_locally

    monkeypatch.delenv("VICUNA_SKY_API_KEYS", raising=False)
    recipe = Recipe.from_yaml(ROOT / "recipes" / "tiny-cpu.yaml")
    controller = load_task(Spec.CONTROLLER, recipe)
    worker = load_task(Spec.WORKER, recipe, {"SERVE_MODEL_PATH": "tiny-llama"})
    config = LocalConfig(runs_dir=tmp_path / "runs", network=network)
    with pytest.raises(VicunaSkyError, match="needs an API key: export VICUNA_SKY_API_KEYS"):
        run_fleet_locally(controller, worker, "keyless", 1, config)
    assert not network.hosts  # nothing was started


def test_an_evaluation_runs_on_a_host_of_its_own(network, tmp_path):
    """sky/eval.yaml through the launcher with --local --hosts: its model server and judge run
    inside its host, which has no route off the bridge, and the report lands in the bucket."""
    import json
    import sys

    from vicuna_sky.launch.jobs import list_jobs

    exe = str(Path(sys.executable).parent / "vicuna-sky")
    recipe = str(ROOT / "recipes" / "tiny-cpu.yaml")
    done = subprocess.run(
        [exe, "eval", "launch", recipe, "--local", "--hosts", "--workdir", "w",
         "--env", "SERVE_MODEL_PATH=tiny-llama"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "hosts: each node its own address on vsky" in done.stdout
    (job,) = list_jobs(tmp_path / "w" / "runs")
    (address,) = job.attempts[0].addresses
    assert address.startswith("198.18.")
    report = Path(re.search(r"report: (\S+)", done.stdout).group(1))
    assert json.loads(report.read_text())
