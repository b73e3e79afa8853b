"""sky/serve-controller.yaml and sky/serve-worker.yaml on the local backend, as the cloud runs
them: a worker preempted (SIGKILL, no notice) under load is relaunched as a managed job,
registers again, and not one non-streamed request fails."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import yaml

from vicuna_sky.launch.tasks import Spec, load_task
from vicuna_sky.localcloud.cluster import LocalConfig
from vicuna_sky.localcloud.fleet import LocalSkyFleet
from vicuna_sky.models import resolve_model_path
from vicuna_sky.recipe import Recipe
from vicuna_sky.tiny import CHATML, build_tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def test_a_preempted_worker_is_relaunched_registers_again_and_no_request_fails(
    tmp_path, monkeypatch
):
    for key in ("VICUNA_SKY_API_KEYS", "VICUNA_SKY_FLEET_SECRET", "VICUNA_SKY_UI_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    model = resolve_model_path("tiny-llama", tmp_path / "models")  # a real model, real tokens
    recipe = Recipe.from_yaml(ROOT / "recipes" / "tiny-cpu.yaml")
    controller = load_task(Spec.CONTROLLER, recipe)
    worker = load_task(
        Spec.WORKER,
        recipe,
        {"CONTROLLER_URL": "http://CONTROLLER:8000", "SERVE_MODEL_PATH": model},
    )
    config = LocalConfig(runs_dir=tmp_path / "runs", bucket_root=tmp_path / "buckets")
    events: list[str] = []
    with LocalSkyFleet(controller, worker, "tiny", 2, config, on_event=events.append) as fleet:
        fleet.start(timeout=300)
        outcomes: list[int | str] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=fleet.url, timeout=120) as http:
                while not stop.is_set():
                    try:
                        r = http.post(
                            "/v1/chat/completions",
                            json={
                                "model": recipe.serve.model_name,
                                "messages": [{"role": "user", "content": "Tell me a story."}],
                                "max_tokens": 24,
                            },
                        )
                        ok = r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
                        outcomes.append(200 if ok else f"{r.status_code} {r.text[:200]}")
                    except httpx.HTTPError as e:
                        outcomes.append(f"{type(e).__name__}: {e}")

        clients = [threading.Thread(target=client) for _ in range(4)]
        for t in clients:
            t.start()
        try:
            _until(lambda: len(outcomes) >= 20, 120, "load before the preemption")
            victim = fleet.workers[0].runner
            assert victim.preempt(grace_seconds=0)  # SIGKILL to the whole "VM", no notice
            served_before = len(outcomes)
            _until(lambda: len(victim.job.attempts) >= 2, 120, "the relaunch")
            fleet.wait_registered(2, timeout=300)  # the relaunched worker is routed to again
            _until(lambda: len(outcomes) >= served_before + 40, 180, "load after the relaunch")
        finally:
            stop.set()
            for t in clients:
                t.join(150)
        failures = [o for o in outcomes if o != 200]
        assert not failures, failures[:5]
        first, second = victim.job.attempts[:2]
        assert first.status == "PREEMPTED" and "SIGKILL" in first.reason
        assert victim.job.recoveries == 1 and victim.job.status == "RUNNING"
        assert (Path(second.workdir).parent / "run-rank0.log").exists()
    assert any("tiny-worker-0: RECOVERING" in e for e in events)


def _until(done, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_chatml_recipe_is_served_with_its_chat_template(tmp_path, monkeypatch):
    """The recipe's model.template reaches sky/serve-worker.yaml's worker: a model trained with
    `chat_template` (ChatML here) is prompted with it, not with the worker's default Vicuna
    template. The worker's rendered prompt is read back as the prompt tokens it counted."""
    from transformers import AutoTokenizer

    for key in ("VICUNA_SKY_API_KEYS", "VICUNA_SKY_FLEET_SECRET", "VICUNA_SKY_UI_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    model = build_tiny_llama(tmp_path / "chatml", chat_template=CHATML)
    raw = yaml.safe_load((ROOT / "recipes" / "tiny-cpu.yaml").read_text())
    raw["model"]["template"] = "chat_template"
    (tmp_path / "chatml.yaml").write_text(yaml.safe_dump(raw))
    recipe = Recipe.from_yaml(tmp_path / "chatml.yaml")
    controller = load_task(Spec.CONTROLLER, recipe)
    worker = load_task(
        Spec.WORKER,
        recipe,
        {"CONTROLLER_URL": "http://CONTROLLER:8000", "SERVE_MODEL_PATH": str(model)},
    )
    assert worker.envs["TEMPLATE"] == "chat_template"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tokenizer = AutoTokenizer.from_pretrained(model)
    chatml = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chatml.startswith("<|im_start|>user\n")
    want = len(tokenizer(chatml, add_special_tokens=False).input_ids)
    config = LocalConfig(runs_dir=tmp_path / "runs", bucket_root=tmp_path / "buckets")
    with LocalSkyFleet(controller, worker, "chatml", 1, config) as fleet:
        fleet.start(timeout=300)
        r = httpx.post(
            f"{fleet.url}/v1/chat/completions",
            json={"model": recipe.serve.model_name, "messages": messages, "max_tokens": 2},
            timeout=120,
        )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == want
