"""The bases shipped with the package stay the ones `aha pretrain` builds today.

A shipped base is stale when the pretraining config it was built from no longer has its cache
key (a default changed, or CORPUS_VERSION was bumped) or when the corpus generator no longer
writes the same documents (a trace grammar changed without a version bump). Either way a test
here fails, and the fix is to rebuild it with the command its manifest records.
"""

from __future__ import annotations

import json
import shlex
import shutil

import pytest

from ahamoment import base_models, cli
from ahamoment import config as cfglib
from ahamoment.stages.distill import DistillConfig
from ahamoment.stages.pretrain import PretrainConfig
from ahamoment.stages.r1 import R1Config
from ahamoment.stages.zero import ZeroConfig

SHIPPED = base_models.shipped_keys()
ZERO_CODE = "recipes/zero-code.yaml"
ZERO_AHA = "recipes/zero-aha.yaml"


def _manifest(key: str) -> dict:
    return json.loads((base_models.SHIPPED / key / base_models.MANIFEST).read_text())


def _config_of(command: str) -> PretrainConfig:
    """The config the manifest's `aha pretrain` command line builds."""
    argv = shlex.split(command)
    assert argv[:2] == ["aha", "pretrain"], command
    parser = cli._parser("pretrain", cli.COMMANDS["pretrain"], PretrainConfig)
    args = vars(parser.parse_args(argv[2:]))
    return cfglib.build(PretrainConfig, args.pop("recipe", None), **args)


def test_the_bases_the_readme_starts_from_are_shipped():
    # aha zero (and sft, eval, serve) with no --model, aha distill's student, aha r1's base,
    # the code task's base
    defaults = {
        "zero": cfglib.build(PretrainConfig, task="countdown"),
        "distill student": cfglib.build(PretrainConfig, DistillConfig().student_recipe),
        "r1": PretrainConfig(task="countdown", p_foreign=R1Config().p_foreign),
        # aha zero --recipe recipes/zero-code.yaml
        "code": cfglib.build(PretrainConfig, cfglib.build(ZeroConfig, ZERO_CODE).pretrain_recipe),
        # aha zero --recipe recipes/zero-aha.yaml: the aha base (3.5M parameters)
        "aha": cfglib.build(PretrainConfig, cfglib.build(ZeroConfig, ZERO_AHA).pretrain_recipe),
    }
    missing = {k: c.cache_key() for k, c in defaults.items() if c.cache_key() not in SHIPPED}
    assert missing == {}, "rebuild with `aha pretrain ... --out src/ahamoment/shipped/KEY`"


@pytest.mark.parametrize("key", SHIPPED)
def test_a_shipped_base_is_what_its_recorded_command_builds_today(key):
    m = _manifest(key)
    cfg = _config_of(m["command"])
    assert cfg.cache_key() == m["cache_key"] == key  # the key of today's code and defaults
    assert m["threads"] == cfg.threads and m["seed"] == cfg.seed
    # the corpus generator still writes the documents the model was trained on
    assert base_models.corpus_hash(cfg) == m["corpus_sha256"]
    base_models.check_files(base_models.SHIPPED / key)  # and no file changed since


def test_ensure_base_model_takes_the_shipped_base_without_building(monkeypatch):
    from ahamoment.stages import pretrain

    def no_build(*a, **k):
        raise AssertionError("built a base model that is shipped")

    monkeypatch.setattr(pretrain, "pretrain", no_build)
    key = PretrainConfig().cache_key()
    assert base_models.ensure_base_model("", "countdown") == base_models.SHIPPED / key


def test_a_pretrain_recipe_keeps_its_own_task(monkeypatch):
    # zero-aha.yaml evaluates on countdown_tinyzero_100 a base pretrained on countdown_levels:
    # the run's task must not replace the recipe's (that would build another base)
    from ahamoment.stages import pretrain

    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("built a base"))
    zero = cfglib.build(ZeroConfig, ZERO_AHA)
    got = base_models.ensure_base_model("", zero.task, zero.pretrain_recipe)
    assert got.parent == base_models.SHIPPED and got.name.startswith("countdown_levels-")


def test_a_changed_file_or_a_changed_corpus_is_caught(tmp_path, monkeypatch):
    key = SHIPPED[0]
    copy = tmp_path / key
    shutil.copytree(base_models.SHIPPED / key, copy)
    base_models.check_files(copy)
    blob = bytearray((copy / "model.safetensors").read_bytes())
    blob[-1] ^= 1  # one bit of one weight
    (copy / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="model.safetensors differ"):
        base_models.check_files(copy)
    # a trace grammar changed without a CORPUS_VERSION bump: the hash moves
    cfg = _config_of(_manifest(key)["command"])
    noisier = cfglib.build(PretrainConfig, **{**vars(cfg), "p_give_up": cfg.p_give_up / 2})
    assert base_models.corpus_hash(noisier) != _manifest(key)["corpus_sha256"]


def test_the_recorded_command_round_trips_every_setting():
    # pretrain_command writes flags for what differs from the defaults, booleans included
    cfg = cfglib.build(PretrainConfig, check_by_difference=False, hidden=96, threads=1)
    command = base_models.pretrain_command(cfg)
    assert command == "aha pretrain --no-check-by-difference --hidden 96 --threads 1"
    assert _config_of(command).cache_key() == cfg.cache_key()


def test_two_processes_on_an_empty_cache_build_once_and_share_it(tmp_path):
    # the trap seen on a fresh machine: two stages started together both built the same base
    import os
    import subprocess
    import sys
    from pathlib import Path

    tiny = Path(__file__).parent.parent / "recipes" / "pretrain-tiny.yaml"
    code = (
        "import sys; from rich.console import Console; from ahamoment.base_models import "
        f"ensure_base_model; print('->', ensure_base_model('', 'countdown', {str(tiny)!r}, 1, "
        "Console(force_terminal=False)))"
    )
    env = {**os.environ, "AHAMOMENT_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("building it" in o for o in outs) == 1, outs  # one build
    paths = {o.split("-> ")[-1].strip() for o in outs}
    assert len(paths) == 1 and (Path(paths.pop()) / "model.safetensors").exists()
