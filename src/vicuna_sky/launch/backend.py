"""Where a launch runs: the one interface the launch steps (launch/runner.py) hand a task to.

Two backends implement it: SkyPilot's SDK on the clouds (launch/skypilot_backend.py) and the
local cloud on this machine (localcloud/backend.py). A backend decides what only it can
know: where the data is staged, which checks it needs before it provisions anything, what a
dry run says about it, whether a run of the same name is in progress, and how a task, a fleet,
its logs and its teardown are done there. The steps decide everything else, once, for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from vicuna_sky.launch.tasks import Spec
from vicuna_sky.recipe import Recipe

if TYPE_CHECKING:
    from vicuna_sky.launch.jobs import LocalJob
    from vicuna_sky.launch.preflight import Finding


@dataclass
class Launch:
    """One launch as the steps pass it along: what was asked, the task built for it, and what
    the steps decided on the way (the cost plan)."""

    spec: Spec
    recipe: Recipe
    task: object
    """The SkyPilot task (sky.Task) built from the spec in sky/ and the recipe."""
    name: str
    overrides: dict[str, str] = field(default_factory=dict)
    fresh: bool = False
    public: bool = False
    over_budget: bool = False
    skip_preflight: tuple[str, ...] = ()
    plan: object = None
    """The cost plan of a GPU training run (vicuna_sky.plan), when there is one."""
    no_plan: str = ""
    """Why there is no plan (offline, no catalog), when one was looked for."""


class Backend(Protocol):
    local: bool
    """Runs on this machine (the commands then take --local)."""
    bills: bool
    """A launch here costs money: a budget is enforced before it."""

    def data_bucket(self, launch: Launch) -> str:
        """Where local data is uploaded for the task: its bucket URL, or the folder standing
        in for it."""

    def workspace(self) -> Path:
        """Where this machine prepares what it uploads (the packaged sample's files)."""

    def preflight(self, launch: Launch, needs: str) -> list[Finding]:
        """The checks this backend makes before it provisions anything, of those that need
        `needs` (preflight.NEEDS); a check that cannot pass here may raise at once."""

    def describe(self, launch: Launch) -> None:
        """What a dry run says about running here (the folders standing in for the bucket;
        who may call an endpoint)."""

    def admit(self, launch: Launch) -> None:
        """Refuse what may not run here, before anything is launched (an endpoint that would
        open to the internet without keys)."""

    def in_progress(self, launch: Launch) -> tuple[str, str]:
        """A run in progress that writes `launch`'s checkpoints, and where it runs (('', '')
        when none does): one of the same name, or a training run of the same RUN_NAME and
        RUN_TAG under another name."""

    def launch(self, launch: Launch) -> LocalJob | None:
        """Run the task: a local job when it runs here, else None once SkyPilot has it."""

    def launch_fleet(self, recipe: Recipe, controller: object, worker: object, name: str) -> None:
        """Start (or repair) a fleet: its controller and the recipe's `serve.workers` worker
        jobs."""

    def down(self, name: str, kind: str) -> list[str]:
        """Stop what runs as `name` (a `kind`: job, cluster, service, fleet); the names
        stopped."""

    def logs(self, name: str, kind: str, **options: object) -> None:
        """Print the logs of `name`."""
