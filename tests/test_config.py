"""Configs: docstrings become --help, recipes load, bad input names the file and line."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from ahamoment import cli
from ahamoment import config as cfglib
from ahamoment.stages.zero import ZeroConfig

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@dataclass
class Toy:
    steps: int = 3
    """How many steps."""
    lr: float = 0.1
    """Learning rate."""
    name: str = "x"
    """A name."""
    flag: bool = False
    """A switch."""


def test_field_docs_are_read_from_source():
    assert cfglib.field_docs(Toy) == {
        "steps": "How many steps.",
        "lr": "Learning rate.",
        "name": "A name.",
        "flag": "A switch.",
    }


STAGE_CONFIGS = [cli.load_stage(c)[0] for c in cli.COMMANDS.values()]


@pytest.mark.parametrize("cls", STAGE_CONFIGS, ids=lambda c: c.__name__)
def test_every_stage_field_is_documented(cls):
    import dataclasses

    docs = cfglib.field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert missing == []


def test_layers_defaults_recipe_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 10\nlr: 0.5\n")
    cfg = cfglib.build(Toy, recipe, lr="0.25", flag="true")
    assert (cfg.steps, cfg.lr, cfg.name, cfg.flag) == (10, 0.25, "x", True)


def test_unknown_recipe_key_names_file_line_and_suggestion(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 10\n\nlearning_rat: 0.5\n")
    with pytest.raises(cfglib.ConfigError, match=r"r\.yaml:3: unknown field 'learning_rat'"):
        cfglib.build(ZeroConfig, recipe)
    with pytest.raises(cfglib.ConfigError, match="did you mean 'lr'"):
        cfglib.build(Toy, recipe.write_text("lrr: 1\n") and recipe)


def test_bad_value_and_bad_yaml_name_the_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 10\nlr: fast\n")
    with pytest.raises(cfglib.ConfigError, match=r"r\.yaml:2: field 'lr'"):
        cfglib.build(Toy, recipe)
    recipe.write_text("steps: 10\nlr: [1,\n")
    with pytest.raises(cfglib.ConfigError, match=r"r\.yaml:\d+: invalid YAML"):
        cfglib.build(Toy, recipe)


def test_post_init_rejects_bad_combinations():
    with pytest.raises(cfglib.ConfigError, match="minibatches"):
        cfglib.build(ZeroConfig, prompts_per_step=4, group_size=3, minibatches=5)
    with pytest.raises(cfglib.ConfigError, match="unknown policy loss"):
        cfglib.build(ZeroConfig, loss="nope")
    with pytest.raises(cfglib.ConfigError, match="group_size"):
        cfglib.build(ZeroConfig, group_size=1)
    with pytest.raises(cfglib.ConfigError, match="micro_batch"):
        cfglib.build(ZeroConfig, prompts_per_step=2, group_size=4, micro_batch=3)
    assert cfglib.build(ZeroConfig, prompts_per_step=2, group_size=4, micro_batch=32).micro_batch
    with pytest.raises(cfglib.ConfigError, match="lr_decay"):
        cfglib.build(ZeroConfig, steps=10, lr_decay=-1)
    with pytest.raises(cfglib.ConfigError, match="real_k"):
        cfglib.build(ZeroConfig, real_k=0)


def test_reward_weights_parse():
    cfg = ZeroConfig(reward="accuracy=1.0, format=0.1")
    assert cfg.reward_weights() == {"accuracy": 1.0, "format": 0.1}
    assert ZeroConfig(reward="accuracy").reward_weights() == {"accuracy": 1.0}
    with pytest.raises(ValueError, match="unknown reward"):
        ZeroConfig(reward="accurcy=1")


def test_a_recipe_names_another_relative_to_itself_and_a_flag_relative_to_cwd(
    tmp_path, monkeypatch
):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "z.yaml").write_text("pretrain_recipe: p.yaml\n")
    monkeypatch.chdir(tmp_path / "recipes")  # the run starts elsewhere
    cfg = cfglib.build(ZeroConfig, tmp_path / "recipes" / "z.yaml")
    assert cfg.pretrain_recipe == str(tmp_path / "recipes" / "p.yaml")
    cfg = cfglib.build(ZeroConfig, tmp_path / "recipes" / "z.yaml", pretrain_recipe="q.yaml")
    assert cfg.pretrain_recipe == "q.yaml"
    monkeypatch.chdir(tmp_path)
    assert cfglib.build(ZeroConfig, "recipes/z.yaml").pretrain_recipe == "recipes/p.yaml"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(recipe):
    assert RECIPES, "no recipes found"
    text = recipe.read_text()
    stage = recipe.name.split("-")[0]  # the stage the name starts with
    cls, _ = cli.load_stage(cli.COMMANDS[stage])
    cfg = cfglib.build(cls, recipe)
    assert isinstance(cfg, cls) and text
    for name, value in cfglib.to_dict(cfg).items():  # a recipe a recipe names exists
        if name.endswith("_recipe") and value:
            assert Path(value).is_file(), f"{recipe.name}: {name}: {value}"
    # the header says what the recipe does, in 5 lines or fewer (results live in docs/results)
    header = [ln for ln in text.split("\n\n")[0].splitlines() if ln.startswith("#")]
    assert 1 <= len(header) <= 5, f"{recipe.name}: {len(header)} header lines"


RECOMMENDED = {
    "zero": "zero-countdown.yaml",
    "pretrain": "pretrain-countdown.yaml",
    "eval": "eval-countdown.yaml",
    "distill": "distill-countdown.yaml",
    "r1": "r1-countdown.yaml",
}


@pytest.mark.parametrize("stage", sorted(RECOMMENDED))
def test_a_bare_stage_runs_its_recommended_recipe(stage, monkeypatch):
    # `aha zero` with no flags is `aha zero --recipe recipes/zero-countdown.yaml`, field by field
    cls = cli.load_stage(cli.COMMANDS[stage])[0]
    monkeypatch.chdir(Path(__file__).parent.parent)  # the defaults name recipes from the root
    recipe = Path("recipes") / RECOMMENDED[stage]
    bare, recommended = cfglib.to_dict(cfglib.build(cls)), cfglib.to_dict(cfglib.build(cls, recipe))
    assert {k: v for k, v in bare.items() if recommended[k] != v} == {}


def test_a_shared_field_keeps_its_doc_where_a_stage_changes_its_default():
    from ahamoment.args import HeldoutArgs, LoraArgs
    from ahamoment.stages.sft import SFTConfig

    assert ZeroConfig().lora_rank == 8 and SFTConfig(data="x").lora_rank == 0
    assert ZeroConfig().max_new_tokens == 192 and HeldoutArgs().max_new_tokens == 128
    for cls in (ZeroConfig, SFTConfig):
        assert cfglib.field_docs(cls)["lora_rank"] == cfglib.field_docs(LoraArgs)["lora_rank"]


def test_help_shows_each_argument_group_as_a_section(capsys):
    with pytest.raises(SystemExit):
        cli.main(["zero", "--help"])
    out = capsys.readouterr().out
    sections = [
        ln[:-1] for ln in out.splitlines() if ln and not ln[0].isspace() and ln.endswith(":")
    ]
    assert sections[-5:] == [
        "GRPO: rollouts, rewards, the policy update and periodic evaluation",
        "Base model and task",
        "Optimisation, hardware and the run directory",
        "LoRA adapters (peft)",
        "Held-out evaluation",
    ]
    # a shared field is listed under its group: --lora-rank after the LoRA heading
    assert out.index("\n  --lora-rank N") > out.index("LoRA adapters (peft):")


def test_lr_schedule_warms_up_holds_then_decays_to_the_last_step():
    from ahamoment.stages.zero import lr_factor

    cfg = cfglib.build(ZeroConfig, steps=10, warmup=2, lr_decay=4)
    # warm-up 1/2, 2/2; constant; then 4/4, 3/4, 2/4, 1/4 on steps 6..9 (the last step)
    assert [lr_factor(cfg, s) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    whole = cfglib.build(ZeroConfig, steps=4, warmup=1, lr_decay=100)  # decays over all 4
    assert [lr_factor(whole, s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    flat = cfglib.build(ZeroConfig, steps=10, warmup=2, lr_decay=0)
    assert [lr_factor(flat, s) for s in range(10)] == [0.5] + [1.0] * 9


def test_warmup_cosine_reaches_the_floor_at_the_last_step():
    from ahamoment.schedules import warmup_cosine

    got = [warmup_cosine(s, warmup_steps=2, total=6) for s in range(7)]
    # warm-up 1/2, 2/2; then 0.1 + 0.45 (1 + cos(pi p)) at p = 0, 1/4, 1/2, 3/4, 1
    want = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + 0.5**0.5), 0.55, 0.1 + 0.45 * (1 - 0.5**0.5), 0.1]
    assert got == pytest.approx(want, abs=1e-12)
