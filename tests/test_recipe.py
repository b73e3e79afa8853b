import re
from pathlib import Path

import pytest

from vicuna_sky.recipe import Recipe, RecipeError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
MINIMAL = "name: t\nmodel: {path: m}\ndata: {path: d.json}\nbucket: s3://b\n"


def load(text: str) -> Recipe:
    return Recipe.from_text(text, source="r.yaml")


def test_bundled_recipes_load():
    names = {"vicuna-7b": "vicuna-7b", "vicuna-13b": "vicuna-13b"}
    names |= {"tiny-cpu": "vicuna-tiny", "smollm2-cpu": "vicuna-smol"}
    assert {p.stem for p in RECIPES} == set(names)
    for path in RECIPES:
        recipe = Recipe.from_yaml(path)
        assert recipe.source == str(path)
        assert recipe.envs()["RUN_NAME"] == recipe.name == names[path.stem]


def test_lora_and_packing_reach_the_trainer():
    smol = Recipe.from_yaml(ROOT / "recipes" / "smollm2-cpu.yaml")
    assert (smol.envs()["LORA_R"], smol.envs()["PACKING"]) == ("16", "false")
    assert smol.model.template == "chat_template" and smol.model.path == "smollm2-135m"
    train_spec = (ROOT / "sky" / "train.yaml").read_text()
    assert '--lora-r "$LORA_R"' in train_spec and '--packing "$PACKING"' in train_spec
    bad = (ROOT / "recipes" / "tiny-cpu.yaml").read_text().replace("  seed: 0", "  lora_r: -1")
    with pytest.raises(RecipeError, match=r"train\.lora_r"):
        Recipe.from_text(bad)


@pytest.mark.parametrize("name", ["vicuna-7b", "vicuna-13b"])
def test_vicuna_recipes_carry_vicuna_hyper_parameters(name):
    r = Recipe.from_yaml(ROOT / "recipes" / f"{name}.yaml")
    t = r.train
    assert (t.lr, t.epochs, t.global_batch_size, t.lr_scheduler) == (2e-5, 3, 128, "cosine")
    assert 0.03 <= t.warmup_ratio <= 0.04
    assert r.data.max_length == 2048
    assert t.precision == "bf16" and t.gradient_checkpointing
    assert r.resources.spot and r.resources.gpus_per_node == 8
    # Gradient accumulation makes 128 sequences per step exactly.
    assert t.micro_batch_size * r.world_size * r.grad_accum_steps == 128


def test_envs_render_recipe_values():
    r = Recipe.from_yaml(ROOT / "recipes" / "vicuna-7b.yaml")
    envs = r.envs()
    assert envs["LR"] == "2e-05" and envs["NUM_EPOCHS"] == "3"
    assert envs["MODEL_PATH"] == "meta-llama/Llama-2-7b-hf"
    assert envs["GRADIENT_CHECKPOINTING"] == "true"
    assert envs["BUCKET_URL"] == "gs://vicuna-sky-bucket"
    assert all(isinstance(v, str) for v in envs.values())


def test_minimal_recipe_gets_defaults():
    r = load(MINIMAL)
    assert r.train.lr == 2e-5 and r.resources.accelerator == "A100-80GB"


def test_exponent_without_dot_is_a_number():
    # PyYAML reads `2e-5` as a string; a recipe author means the number.
    assert load(MINIMAL + "train: {lr: 2e-5}\n").train.lr == 2e-5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("train: {learning_rate: 1}\n", "unknown key 'train.learning_rate'"),
        ("train: {lrr: 1.0}\n", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("bukcet_usd: 3\n", "unknown key 'bukcet_usd' (did you mean 'budget_usd'?)"),
        ("train: {epochs: three}\n", "'train.epochs' must be a number, got 'three'"),
        ("train: {global_batch_size: 12.5}\n", "'train.global_batch_size' must be an integer"),
        ("resources: {spot: 'yes'}\n", "'resources.spot' must be true or false"),
        ("resources: {clouds: [aws, 3]}\n", "'resources.clouds[1]' must be a string"),
        ("train: 5\n", "'train' must be a mapping"),
        ("train: {precision: bf61}\n", "(did you mean 'bf16'?)"),
        ("train: {global_batch_size: 100}\n", "must be a multiple of micro_batch_size x devices"),
        ("train: {warmup_ratio: 1.5}\n", "'train.warmup_ratio' must be in [0, 1)"),
        ("resources: {regions: [us-east-1]}\n", "must be 'cloud/region'"),
        ("resources: {clouds: [aws], regions: [gcp/us-central1]}\n", "not in resources.clouds"),
    ],
)
def test_bad_recipes_name_the_key(extra, message):
    with pytest.raises(RecipeError) as e:
        load(MINIMAL + extra)
    assert message in str(e.value)
    assert str(e.value).startswith("r.yaml: ")
    assert "\n" not in str(e.value)


def test_missing_required_key_and_bad_bucket():
    with pytest.raises(RecipeError, match=r"missing required key 'model\.path'"):
        load("name: t\nmodel: {}\ndata: {path: d}\nbucket: s3://b\n")
    with pytest.raises(RecipeError, match="'bucket' must be a URL"):
        load("name: t\nmodel: {path: m}\ndata: {path: d}\nbucket: mybucket\n")


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load("name: [\n")
    with pytest.raises(RecipeError, match="cannot read recipe"):
        Recipe.from_yaml(tmp_path / "nope.yaml")


def test_a_key_given_twice_is_an_error(tmp_path):
    text = (Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml").read_text()
    twice = text.replace("  lr: 1.0e-3\n", "  lr: 1.0e-3\n  lr: 5.0e-4\n")
    assert twice != text
    with pytest.raises(RecipeError, match=r"key 'lr' appears twice \(lines \d+ and \d+\)"):
        Recipe.from_text(twice, source="twice.yaml")


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("  write_gb_per_second: 0\n", "'plan.write_gb_per_second' must be positive"),
        ("  preemptions_per_hour: -1\n", "'plan.preemptions_per_hour' must not be negative"),
        ("  checkpoint_bytes_per_param: 0.5\n", "'plan.checkpoint_bytes_per_param' must be in"),
        ("  preemption_rates: {gcp: -0.5}\n", "'plan.preemption_rates.gcp' must not be negative"),
        ("  preemption_rates: {a/b/c: 0.5}\n", "keyed 'cloud' or 'cloud/region'"),
        ("  preemption_rates: [1]\n", "'plan.preemption_rates' must be a mapping"),
        ("  preemption_rates: {gcp: fast}\n", "'plan.preemption_rates.gcp' must be a number"),
    ],
)
def test_plan_section_checked(yaml, message):
    text = (
        (ROOT / "recipes" / "vicuna-7b.yaml")
        .read_text()
        .replace("  mfu: 0.4\n", "  mfu: 0.4\n" + yaml)
    )
    with pytest.raises(RecipeError, match=re.escape(message)):
        Recipe.from_text(text, source="r.yaml")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("params_b: 6.74", "params_b: 0", "'model.params_b' must be positive, got 0"),
        ("params_b: 6.74", "params_b: -7", "'model.params_b' must be positive, got -7"),
        ("[A100-80GB:8, H100:8, A100:8]", "[H100:4]", "asks 4 GPUs per node"),
        ("[A100-80GB:8, H100:8, A100:8]", "[H100:eight]", "must be NAME or NAME:COUNT"),
        ("[A100-80GB:8, H100:8, A100:8]", "[any, H100]", "must be NAME or NAME:COUNT"),
    ],
)
def test_accelerators_and_model_size_checked(old, new, message):
    text = (ROOT / "recipes" / "vicuna-7b.yaml").read_text()
    assert old in text
    with pytest.raises(RecipeError, match=re.escape(message)):
        Recipe.from_text(text.replace(old, new), source="r.yaml")
    accepted = text.replace("[A100-80GB:8, H100:8, A100:8]", "[any]")
    assert Recipe.from_text(accepted, source="r.yaml").resources.accelerators == ["any"]


def test_held_out_data_and_eval_cadence_reach_the_trainer():
    smol = Recipe.from_yaml(ROOT / "recipes" / "smollm2-cpu.yaml")
    envs = smol.envs()
    # demo-sample's held-out quarter: made and uploaded at launch, which then sets EVAL_PATH.
    assert smol.data.path == "demo-sample" and envs["EVAL_PATH"] == smol.data.eval_path == ""
    assert envs["EVAL_EVERY_STEPS"] == "2" and smol.data.eval_fraction == 0.25
    train_spec = (ROOT / "sky" / "train.yaml").read_text()
    assert '--eval-path "$EVAL"' in train_spec and '--eval-every-steps "$EVAL_EVERY_STEPS"' in (
        train_spec
    )
    text = (ROOT / "recipes" / "tiny-cpu.yaml").read_text()
    for bad, key in (
        (
            text.replace("  tokens: 20000", "  tokens: 20000\n  eval_fraction: 1.5"),
            "data.eval_fraction",
        ),
        (text.replace("  seed: 0", "  eval_every_steps: -1"), "train.eval_every_steps"),
    ):
        with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
            Recipe.from_text(bad)
