"""Recipe + a spec in `sky/` -> a validated `sky.Task`.

The spec YAML stays the source of truth: the recipe only fills in the env vars the spec
declares and the resources (GPU type and count, spot, clouds/regions, nodes), exactly what
`sky launch --env ... --gpus ...` would change. Validation is SkyPilot's own (schema,
resources, and the service checks for SkyServe specs); its errors come back as one line.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vicuna_sky.errors import VicunaSkyError, one_line
from vicuna_sky.recipe import Recipe

if TYPE_CHECKING:
    import sky

# `sky/` and `recipes/` are data that live beside the package in the checkout: the cloud
# path ships the checkout itself (`workdir: .`), so the launcher runs from one.
PROJECT_ROOT = Path(__file__).resolve().parents[3]


class SpecError(VicunaSkyError):
    """A task spec (or an override of it) that SkyPilot would reject."""


class Spec(str, Enum):
    """The task specs in `sky/`, by the role they play."""

    TRAIN = "train.yaml"
    CONTROLLER = "serve-controller.yaml"
    WORKER = "serve-worker.yaml"
    SERVICE = "service.yaml"
    EVAL = "eval.yaml"


def data_dir(name: str) -> Path:
    """`sky/` or `recipes/` of the checkout this package is installed from."""
    if (PROJECT_ROOT / name).is_dir():
        return PROJECT_ROOT / name
    raise VicunaSkyError(f"no '{name}/' in {PROJECT_ROOT}: install vicuna-sky from a checkout")


def spec_path(spec: Spec) -> Path:
    return data_dir("sky") / spec.value


def resolve_recipe(arg: str | Path) -> Path:
    """A recipe given as a path, or by name (`vicuna-7b`) from the bundled `recipes/`."""
    path = Path(arg)
    if path.is_file():
        return path
    bundled = data_dir("recipes") / f"{path.stem}.yaml"
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    names = sorted(p.stem for p in data_dir("recipes").glob("*.yaml"))
    raise VicunaSkyError(f"no recipe '{arg}' (a YAML path, or one of: {', '.join(names)})")


def parse_env_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`--env KEY=VALUE` pairs, as `sky launch --env` takes them."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SpecError(f"--env expects KEY=VALUE, got '{pair}'")
        out[key] = value
    return out


def read_spec(spec: Spec) -> dict[str, Any]:
    path = spec_path(spec)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read the spec ({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise SpecError(f"{path}: a task spec is a YAML mapping")
    return config


def train_accelerators(recipe: Recipe) -> list[str]:
    """The recipe's GPU types as SkyPilot accelerator strings (NAME:COUNT). `any` needs the
    catalog to say what exists: the plan sets those (set_accelerators); here it is the
    recipe's accelerator."""
    r = recipe.resources
    if not r.accelerator:
        return []
    names = [a for a in r.accelerators if a.lower() != "any"] or [r.accelerator]
    return [a if ":" in a else f"{a}:{r.gpus_per_node}" for a in names]


def resources_config(
    spec: Spec,
    recipe: Recipe,
    base: dict[str, Any],
    accelerators: list[str] | None = None,
    clouds: list[str] | None = None,
    any_cloud: bool = False,
) -> dict[str, Any]:
    """The spec's `resources:` with the recipe's hardware choices applied. Several training
    GPU types go to SkyPilot as a set (`accelerators: {A100-80GB:8, H100:8}`): its optimizer
    picks one and its recovery may move to another; `accelerators` overrides the recipe's, and
    `clouds` narrows its clouds (the plan keeps a run on its bucket's cloud). Serving and
    evaluation stay on the bucket's cloud too unless `any_cloud` (bucket_side)."""
    res = copy.deepcopy(base)
    r = recipe.resources
    if clouds is None and spec is not Spec.TRAIN and not any_cloud:
        clouds = bucket_side(recipe)
    if spec is Spec.CONTROLLER:
        # Deliberately small, CPU and on-demand, but where the recipe allows (its clouds or
        # regions): a team restricted to one cloud gets its controller there too.
        _allowed_infra(res, recipe, clouds)
        return res
    if spec is Spec.TRAIN:
        accelerator, count, spot = r.accelerator, r.gpus_per_node, r.spot
        res["disk_size"] = r.disk_size_gb  # restarts: MAX_RESTARTS_ON_ERRORS (recipe.envs)
    else:
        s = recipe.serve
        accelerator, count, spot = s.accelerator, s.gpus_per_worker, s.spot
    res["use_spot"] = spot
    choices = (accelerators or train_accelerators(recipe)) if spec is Spec.TRAIN else []
    if accelerator and len(choices) > 1:
        res["accelerators"] = dict.fromkeys(choices)  # a YAML set: {A100:8, H100:8}
        res.pop("cpus", None)
    elif accelerator:
        res["accelerators"] = choices[0] if choices else f"{accelerator}:{count}"
        res.pop("cpus", None)
    else:
        res.pop("accelerators", None)
        res["cpus"] = r.cpus or "2+"
    _allowed_infra(res, recipe, clouds)
    return res


def bucket_side(recipe: Recipe) -> list[str] | None:
    """The bucket's cloud, for the tasks that read it or serve beside those that do: a worker
    on another cloud reads its 13-26 GB model across clouds at every (re)launch, and a fleet's
    controller belongs with its workers. None when the bucket has no cloud (r2://, file://) or
    the recipe names only other clouds (its choice stands)."""
    from vicuna_sky.plan.egress import bucket_cloud

    cloud = bucket_cloud(recipe.bucket)
    r = recipe.resources
    named = {i.partition("/")[0].lower() for i in (r.regions or r.clouds)}
    if cloud is None or (named and cloud not in named):
        return None
    return [cloud]


def _allowed_infra(res: dict[str, Any], recipe: Recipe, clouds: list[str] | None) -> None:
    """The recipe's regions (or clouds) as SkyPilot's `any_of`, replacing the spec's own;
    `clouds` narrows them (the plan keeps a run on its bucket's cloud)."""
    res.pop("any_of", None)
    r = recipe.resources
    infras = r.regions or r.clouds
    if clouds:
        infras = [i for i in r.regions if i.partition("/")[0] in clouds] or clouds
    if infras:
        res["any_of"] = [{"infra": infra} for infra in infras]


def service_config(recipe: Recipe, base: dict[str, Any]) -> dict[str, Any]:
    """The spec's `service:` with the recipe's worker count and spot choice applied."""
    service = copy.deepcopy(base)
    policy = service.setdefault("replica_policy", {})
    workers = recipe.serve.workers
    policy["min_replicas"] = workers
    if "max_replicas" in policy:
        policy["max_replicas"] = max(int(policy["max_replicas"]), workers)
    if not recipe.serve.spot:
        # SkyPilot allows an on-demand fallback only for spot replicas (validate_service_task:
        # "`use_ondemand_fallback` is only supported for spot resources"); on-demand replicas
        # need none.
        policy.pop("dynamic_ondemand_fallback", None)
        policy.pop("base_ondemand_fallback_replicas", None)
    if recipe.serve.tls:
        # SkyServe's load balancer ends TLS with it (one PEM holds the key and the certificate).
        pem = str(serve_tls(recipe)[0])
        service["tls"] = {"keyfile": pem, "certfile": pem}
    return service


def serve_tls(recipe: Recipe) -> tuple[Path, str]:
    """The recipe's `serve.tls` file and its PEM (key and certificate), or a one-line error."""
    from vicuna_sky.serve.tls import TlsError, fingerprint

    path = recipe.path_of(recipe.serve.tls)
    try:
        pem = path.read_text()
        fingerprint(pem)
        if "PRIVATE KEY-----" not in pem:
            raise TlsError("no private key in it")
    except (OSError, UnicodeDecodeError, TlsError) as e:
        raise SpecError(f"serve.tls: {path}: {getattr(e, 'strerror', None) or e}") from None
    return path, pem


def load_task(
    spec: Spec,
    recipe: Recipe,
    overrides: dict[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    any_cloud: bool = False,
) -> sky.Task:
    """Load `spec`, apply the recipe (envs + resources) and `--env` overrides, validate;
    `any_cloud` lets serving and evaluation leave the bucket's cloud.

    The spec's `secrets:` are filled from `environ` (the user's environment by default), as
    `sky launch --secret KEY` takes them: SkyPilot keeps secrets out of its job records and logs,
    where envs are stored in plain text. A secret given as an override is refused for the same
    reason (it would sit in shell history and `ps`)."""
    import sky

    path = spec_path(spec)
    config = read_spec(spec)
    declared = dict(config.get("envs") or {})
    declared_secrets = dict(config.get("secrets") or {})
    envs = {k: v for k, v in recipe.envs().items() if k in declared}
    for key in overrides or {}:
        if key in declared_secrets:
            raise SpecError(
                f"{key} is a secret: export it in your environment and it travels as a "
                "SkyPilot secret (never as an env or on the command line)"
            )
        if key not in declared:
            hint = difflib.get_close_matches(key, list(declared), n=1)
            tail = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise SpecError(f"{path.name} declares no env '{key}'{tail}")
    envs.update(overrides or {})
    if spec is Spec.TRAIN:
        config["num_nodes"] = recipe.resources.nodes
    base = config.get("resources") or {}
    config["resources"] = resources_config(spec, recipe, base, any_cloud=any_cloud)
    if spec is Spec.SERVICE:
        config["service"] = service_config(recipe, config.get("service") or {})
    if config.get("workdir") == "." and (PROJECT_ROOT / "pyproject.toml").is_file():
        # Ship this checkout whatever directory the launcher was started from.
        config["workdir"] = str(PROJECT_ROOT)
    source = os.environ if environ is None else environ
    secrets = [(k, source.get(k) or str(v or "")) for k, v in declared_secrets.items()]
    env_list = [(k, v) for k, v in envs.items() if k in declared]
    try:
        task = sky.Task.from_yaml_config(
            config, env_overrides=env_list, secrets_overrides=secrets or None
        )
        if task.service is not None:
            sky.serve.validate_service_task(task, pool=False)
    except Exception as e:  # SkyPilot raises ValueError, SchemaError, InvalidSkyPilotConfig...
        raise SpecError(f"{path.name}: {one_line(e)}") from None
    if not task.name:
        task.name = path.stem
    return task


def set_accelerators(
    task: sky.Task, recipe: Recipe, accelerators: list[str], clouds: list[str] | None = None
) -> None:
    """Offer SkyPilot these GPU types (the plan's, those that fit) for the training task, on
    `clouds` if given."""
    import sky

    base = read_spec(Spec.TRAIN).get("resources") or {}
    config = resources_config(Spec.TRAIN, recipe, base, accelerators, clouds)
    try:
        task.set_resources(sky.Resources.from_yaml_config(config))
    except Exception as e:  # SkyPilot's own validation: say which set it refused
        raise SpecError(
            f"train.yaml: accelerators {', '.join(accelerators)}: {one_line(e)}"
        ) from None


def resolved_yaml(task: sky.Task) -> str:
    """The task as SkyPilot would run it, in YAML, as `sky launch --dryrun` shows it."""
    config = task.to_yaml_config()
    config.pop("_user_specified_yaml", None)
    # SkyPilot's to_yaml_config() writes secret values in clear; a dry run shows only which
    # secrets are set.
    if isinstance(config.get("secrets"), dict):
        config["secrets"] = {
            k: "<set, redacted>" if v else "<not set>" for k, v in config["secrets"].items()
        }
    return yaml.dump(config, Dumper=_BlockDumper, sort_keys=False, width=100)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (setup:, run:) as `|` blocks, as they read in the spec, instead of
    one long quoted line full of \\n; a value repeated is written out again, not as an alias."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        # Trailing spaces cannot be kept by a block scalar: PyYAML would quote it instead.
        value = "\n".join(line.rstrip() for line in value.splitlines()) + "\n"
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_BlockDumper.add_representer(str, _str)


def missing_secrets(spec: Spec, task: sky.Task) -> list[str]:
    """Secrets this task cannot run without, that are not set: the judge's OPENAI_API_KEY when
    the judge is OpenAI's API (JUDGE_API_BASE empty). Another endpoint may need no key."""
    if spec is not Spec.EVAL:
        return []
    needs_openai = task.envs.get("JUDGE_API_BASE", "") == ""
    key = task.secrets.get("OPENAI_API_KEY")
    if needs_openai and not (key and key.get_secret_value()):
        return ["OPENAI_API_KEY"]
    return []


def run_key(task: sky.Task) -> str:
    """A training run's checkpoints as a SkyPilot name: `RUN_NAME.RUN_TAG` (the managed job's
    task is named so, and a second run writing there is found by it); '' for any other task,
    or a RUN_NAME no name may hold."""
    import re

    envs = task.envs
    if "RUN_NAME" not in envs or "RUN_TAG" not in envs:
        return ""
    key = f"{envs['RUN_NAME']}.{envs['RUN_TAG']}"
    # SkyPilot's own rule for names (0.14.1 sky/task.py:46).
    return key if re.fullmatch(r"[a-zA-Z0-9]+(?:[._-]{1,2}[a-zA-Z0-9]+)*", key) else ""


def checkpoint_url(task: sky.Task) -> str:
    """Where sky/train.yaml commits this run's checkpoints: keyed by the run name and its tag,
    the same after any recovery or jobs-controller restart."""
    envs = task.envs
    return f"{envs['BUCKET_URL'].rstrip('/')}/runs/{envs['RUN_NAME']}/{envs['RUN_TAG']}"
