"""SkyPilot's clouds as a `Backend`: tasks go to SkyPilot's SDK (launch/cloud.py), data to the
recipe's bucket, and nothing is provisioned before the preflight checks pass."""

from __future__ import annotations

from pathlib import Path

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch import preflight
from vicuna_sky.launch.backend import Launch
from vicuna_sky.launch.preflight import Finding
from vicuna_sky.launch.tasks import Spec, run_key
from vicuna_sky.recipe import Recipe
from vicuna_sky.terminal import make_console

console = make_console()

API_KEYS = "VICUNA_SKY_API_KEYS"

ENDPOINTS = (Spec.SERVICE, Spec.CONTROLLER)
"""The specs whose OpenAI API faces the internet: a service, a fleet's controller."""


class SkyPilotBackend:
    local = False
    bills = True

    def data_bucket(self, launch: Launch) -> str:
        return launch.task.envs["BUCKET_URL"]

    def workspace(self) -> Path:
        from vicuna_sky.models import default_cache

        return default_cache().parent

    def preflight(self, launch: Launch, needs: str) -> list[Finding]:
        """Training is checked before anything is uploaded or provisioned: a GPU job that
        fails a minute in has billed its setup already."""
        if launch.spec is not Spec.TRAIN:
            return []
        bucket = self.data_bucket(launch)
        return preflight.run(launch.recipe, launch.task, bucket, launch.skip_preflight, needs)

    def describe(self, launch: Launch) -> None:
        if launch.spec in ENDPOINTS:
            console.print(endpoint_access(launch.task, launch.public)[1])

    def admit(self, launch: Launch) -> None:
        if launch.spec in ENDPOINTS:
            refuse_an_open_endpoint(launch.task, launch.public)

    def in_progress(self, launch: Launch) -> tuple[str, str]:
        from vicuna_sky.launch import cloud

        live = cloud.job_in_progress(launch.name, run_key(launch.task))
        return (live, "as a managed job") if live else ("", "")

    def launch(self, launch: Launch) -> None:
        from vicuna_sky.launch import cloud

        if launch.spec is Spec.SERVICE:
            sha, crt = cloud.service_tls(launch.task, launch.name)
            console.print(
                f"endpoint TLS: certificate SHA-256 {sha}, in {crt} (clients trust that "
                "certificate alone: docs/serving.md, 'Calling the fleet over TLS')"
            )
        if launch.spec is Spec.TRAIN and run_key(launch.task):
            # The job keeps the user's name; its task is named after the checkpoints it writes,
            # which the one-run check looks for (in_progress).
            launch.task.name = run_key(launch.task)
        cloud.launch(launch.spec, launch.task, launch.name)

    def launch_fleet(self, recipe: Recipe, controller: object, worker: object, name: str) -> None:
        from vicuna_sky.launch import cloud

        fleet = cloud.launch_fleet(controller, worker, name, recipe.serve.workers)
        how = (
            "reused (up, and it answers)"
            if fleet.controller_reused
            else "relaunched (its cluster was up but it did not answer)"
            if fleet.controller_relaunched
            else "launched"
        )
        console.print(f"controller {how} at {fleet.url}")
        if recipe.serve.tls:
            console.print(f"clients and the chat UI: https with {recipe.path_of(recipe.serve.tls)}")
        else:
            console.print(
                f"its certificate: SHA-256 {fleet.fingerprint}, in {fleet.certificate} (clients "
                "trust that certificate alone: docs/serving.md, 'Calling the fleet over TLS')"
            )
        for what, jobs_ in (
            ("worker job(s) launched", fleet.launched),
            ("running worker job(s) kept", fleet.kept),
            ("worker job(s) cancelled (they pointed at the old controller)", fleet.cancelled),
        ):
            if jobs_:
                console.print(f"{what}: {', '.join(jobs_)}")

    def down(self, name: str, kind: str) -> list[str]:
        from vicuna_sky.launch import cloud

        return cloud.down(name, kind)

    def logs(self, name: str, kind: str, **options: object) -> None:
        from vicuna_sky.launch import cloud

        cloud.logs(name, kind, replica=options.get("replica"))


def endpoint_access(task: object, public: bool) -> tuple[bool, str]:
    """Whether a cloud endpoint of `task` (its OpenAI API) may open, and the line that says
    how it will be reached."""
    key = task.secrets.get(API_KEYS)
    if key is not None and key.get_secret_value():
        return True, f"endpoint: clients need one of the keys in {API_KEYS}"
    if public:
        return True, "endpoint: [bold]public[/] (--public): no API key, anyone can use it"
    return False, (
        f"endpoint: would be refused: {API_KEYS} is not set (clients present one as their API "
        "key); export it, or pass --public to serve without keys"
    )


def refuse_an_open_endpoint(task: object, public: bool) -> None:
    ok, line = endpoint_access(task, public)
    if not ok:
        raise VicunaSkyError(
            f"serving on a cloud opens the API to the internet, and {API_KEYS} is not set: "
            "export it (comma-separated keys), or pass --public to serve without keys"
        )
    console.print(line)
