"""Checks a training launch passes before anything is provisioned or paid for.

Each failed check is one line that names the fix, and the launch stops there: no cluster, no
managed job, no local run. `--skip-preflight CHECK` (repeatable) overrides one named check.

- `clouds`: a cloud the recipe allows is enabled (what `sky check` recorded); SkyPilot would
  otherwise fail the launch only after the upload, or never find a place to run it.
- `data`: the training data is in the bucket (a local file was uploaded already, see
  data_push; a bucket path must name an object that exists).
- `bucket`: the bucket is reachable and writable (a small probe object, removed again).
- `hf-token`: a gated model on the Hugging Face hub needs HF_TOKEN. Gated or not comes from the
  hub when it answers, else from a known list; the line says which.
- `memory`: the model fits the GPUs, by the planner's memory model (vicuna_sky.plan.memory:
  state sharded by FSDP, the gathered layers and one micro-batch's activations).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from vicuna_sky.errors import VicunaSkyError
from vicuna_sky.launch.tasks import one_line
from vicuna_sky.recipe import Recipe

CHECKS = ("clouds", "data", "bucket", "hf-token", "memory")

KNOWN_GATED = ("meta-llama/", "mistralai/Mistral-", "mistralai/Mixtral-", "google/gemma")
"""Hub organisations and model families that ask users to accept a licence before download,
for when the hub cannot be asked (offline)."""


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    line: str


def check_clouds(recipe: Recipe) -> Finding:
    """The recipe's clouds (its regions' clouds, else resources.clouds, else any) against the
    clouds `sky check` enabled (vicuna_sky.plan.clouds: SkyPilot's own record)."""
    from vicuna_sky.plan.clouds import enabled_clouds

    r = recipe.resources
    wanted = sorted({i.partition("/")[0].lower() for i in (r.regions or r.clouds)})
    enabled = enabled_clouds()
    if not enabled:
        return Finding(
            "clouds", False, "no cloud is enabled here: run `sky check` with your credentials"
        )
    usable = sorted(set(wanted) & enabled) if wanted else sorted(enabled)
    if not usable:
        return Finding(
            "clouds",
            False,
            f"none of the recipe's clouds ({', '.join(wanted)}) is enabled (enabled: "
            f"{', '.join(sorted(enabled))}): run `sky check` with their credentials, or change "
            "resources.clouds",
        )
    return Finding("clouds", True, f"clouds: {', '.join(usable)} enabled")


def check_memory(recipe: Recipe) -> Finding:
    """The planner's memory model (vicuna_sky.plan.memory) for the recipe's GPU type."""
    from vicuna_sky.plan import memory

    r = recipe.resources
    if not r.accelerator:
        return Finding("memory", True, "memory: CPU run, not checked")
    fit = memory.fit(recipe, r.accelerator)
    if fit is None:
        return Finding("memory", True, f"memory: {r.accelerator}'s memory unknown, not checked")
    gpus = r.gpus_per_node * r.nodes
    what = (
        f"{recipe.model.params_b:g}B parameters need about {fit.need_gb:,.1f} GB per GPU on "
        f"{gpus} x {fit.gpu} ({fit.usable_gb:,.1f} GB usable each"
    )
    if not fit.fits:
        return Finding(
            "memory",
            False,
            f"{what}; state {fit.states_gb:,.1f} sharded, activations {fit.activations_gb:,.1f}): "
            "choose larger or more GPUs (resources.accelerator, gpus_per_node, nodes) or LoRA "
            "(train.lora_r)",
        )
    return Finding("memory", True, f"memory: {what})")


def gated(model: str) -> tuple[bool | None, str]:
    """Whether hub model `model` is gated, and where that came from. None: not a hub id."""
    if Path(model).expanduser().exists() or "/" not in model or model.startswith("/"):
        return None, ""
    known = any(model.startswith(prefix) for prefix in KNOWN_GATED)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return known, "known list (HF_HUB_OFFLINE)"
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = model_info(model, timeout=5)
    except GatedRepoError:  # a subclass of the next: the hub knows it, and it is gated
        return True, "the hub"
    except RepositoryNotFoundError:
        raise VicunaSkyError(
            f"model {model!r} is not on the Hugging Face hub: fix model.path"
        ) from None
    except Exception as e:  # offline, rate limit: the list decides
        return known, f"known list (the hub did not answer: {type(e).__name__})"
    return bool(info.gated), "the hub"


def check_hf_token(recipe: Recipe, task: object) -> Finding:
    model = task.envs.get("MODEL_PATH", recipe.model.path)
    is_gated, source = gated(model)
    if is_gated is None:
        return Finding("hf-token", True, "hf-token: not a hub model")
    token = task.secrets.get("HF_TOKEN")
    has_token = bool(token and token.get_secret_value())
    if is_gated and not has_token:
        return Finding(
            "hf-token",
            False,
            f"{model} is gated on the Hugging Face hub (per {source}): accept its licence there "
            "and export HF_TOKEN (it travels as a SkyPilot secret)",
        )
    state = "gated, HF_TOKEN set" if is_gated else "not gated"
    return Finding("hf-token", True, f"hf-token: {model} {state} (per {source})")


def check_bucket(bucket: str) -> Finding:
    """Write a probe object and delete it again."""
    import tempfile

    from checkpoints_sync.factory import open_store

    key = f".vicuna-sky-preflight/{uuid.uuid4().hex}"
    try:
        store = open_store(bucket)
        with tempfile.NamedTemporaryFile() as probe:
            probe.write(b"preflight\n")
            probe.flush()
            store.put_file(Path(probe.name), key)
        store.delete([key])
    except Exception as e:
        return Finding(
            "bucket",
            False,
            f"cannot write to {bucket} ({one_line(e)}): create the bucket or fix `bucket:`, and "
            "check your cloud credentials",
        )
    return Finding("bucket", True, f"bucket: {bucket} is writable")


def check_data(bucket: str, data_path: str) -> Finding:
    from checkpoints_sync.factory import open_store

    if Path(data_path).is_absolute():
        ok = Path(data_path).is_file()
    else:
        try:
            ok = open_store(bucket).exists(data_path)
        except Exception:
            ok = False  # the bucket check says why
    if not ok:
        return Finding(
            "data",
            False,
            f"data {data_path!r} is not in {bucket}: set data.path to your local file (train "
            "uploads it) or upload it with `vicuna-sky data push`",
        )
    return Finding("data", True, f"data: {bucket.rstrip('/')}/{data_path}")


NOTHING, BUCKET, UPLOADED = "nothing", "the bucket", "the uploaded data"
NEEDS = {
    "clouds": NOTHING,
    "memory": NOTHING,
    "hf-token": NOTHING,
    "bucket": BUCKET,
    "data": UPLOADED,
}
"""What each check needs before it can run: the launch asks for the checks of one need at a
time, as it comes to have it (the bucket is known, then the data is in it)."""


def run(
    recipe: Recipe,
    task: object,
    bucket: str,
    skip: set[str] | tuple[str, ...] = (),
    needs: str | None = None,
) -> list[Finding]:
    """The checks that need `needs` (every check when None) and are not skipped, cheapest
    first; `bucket` is the URL (or local folder) to check."""
    unknown = set(skip) - set(CHECKS)
    if unknown:
        raise VicunaSkyError(
            f"--skip-preflight {sorted(unknown)[0]!r}: the checks are {', '.join(CHECKS)}"
        )
    checks = {
        "clouds": lambda: check_clouds(recipe),
        "data": lambda: check_data(bucket, task.envs.get("DATA_PATH", recipe.data.path)),
        "bucket": lambda: check_bucket(bucket),
        "hf-token": lambda: check_hf_token(recipe, task),
        "memory": lambda: check_memory(recipe),
    }
    order = ("clouds", "memory", "hf-token", "bucket", "data")
    wanted = [c for c in order if needs in (None, NEEDS[c]) and c not in skip]
    return [checks[c]() for c in wanted]


def refuse(findings: list[Finding]) -> None:
    failed = [f for f in findings if not f.ok]
    if failed:
        more = f" (and {len(failed) - 1} more: {', '.join(f.check for f in failed[1:])})"
        tail = more if len(failed) > 1 else ""
        raise VicunaSkyError(
            f"preflight {failed[0].check}: {failed[0].line}{tail}; nothing was launched "
            f"(--skip-preflight {failed[0].check} to launch anyway)"
        )
