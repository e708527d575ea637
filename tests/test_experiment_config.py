"""Experiment configs: schema checks, overrides, run-directory config guard."""

import json
import pathlib

import pytest

from sparsemem import cli
from sparsemem.experiment import config as config_lib
from sparsemem.experiment.rundir import RunDir

CONFIGS = pathlib.Path(__file__).parent.parent / "experiments" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_validates(path):
    config = config_lib.load_config(path)
    assert config.name == path.stem or config.name.startswith(path.stem)
    assert "koff" in config.train.variants


def test_override_parses_types_and_promotes_int_to_float():
    base = config_lib.load_config(CONFIGS / "demo.py")
    config = config_lib.apply_overrides(base, ["koff.target_sparsity=0", "train.steps=7",
                                               "data.languages=['en-US', 'de']", "name=x"])
    assert config.koff.target_sparsity == 0.0 and isinstance(config.koff.target_sparsity, float)
    assert config.train.steps == 7
    assert tuple(config.data.languages) == ("en-US", "de")
    assert config.name == "x"
    assert base.train.steps != 7  # the base is not modified


def test_config_flags_spelling_is_the_same_override_as_set():
    argv = ["run", "--config", str(CONFIGS / "ci.py"), "--config.train.steps=20", "--config.koff.target_sparsity",
            "0.06", "--set", "eval.documents=2", "--workdir", "runs/x"]
    rewritten = cli.config_flags_as_set(argv)
    assert rewritten == ["run", "--config", str(CONFIGS / "ci.py"), "--set", "train.steps=20", "--set",
                         "koff.target_sparsity=0.06", "--set", "eval.documents=2", "--workdir", "runs/x"]
    args = cli.build_parser().parse_args(rewritten)
    config = config_lib.apply_overrides(config_lib.load_config(args.config), args.set)
    assert (config.train.steps, config.koff.target_sparsity, config.eval.documents) == (20, 0.06, 2)


def test_a_config_flag_without_a_value_is_refused_naming_it():
    args = cli.build_parser().parse_args(cli.config_flags_as_set(["run", "--config", "c.py", "--config.train.steps"]))
    with pytest.raises(ValueError, match="override 'train.steps' is not KEY=VALUE"):
        config_lib.apply_overrides(config_lib.load_config(CONFIGS / "ci.py"), args.set)


@pytest.mark.parametrize("override, message", [
    ("koff.target_sparsty=0.1", "unknown config key(s) ['koff.target_sparsty']"),
    ("train.steps=1.5", "train.steps=1.5 (number, expected int"),
    ("koff.lora_targets=q", "koff.lora_targets='q' (str, expected sequence"),
    ("eval.mc_questions", "is not KEY=VALUE"),
    ("koff.target_sparsity=1.5", "target_sparsity=1.5 must be in [0, 1)"),
    ("train.variants=('prune_only',)", "must include 'koff'"),
    ("koff.lora_targets=('q', 'x')", "unknown lora_targets ['x']"),
    ("koff.gate_fraction=0", "gate_fraction=0.0 must be in (0, 1]"),
    ("eval.mc_tasks=('summary',)", "unknown tasks ['summary']"),
    ("koff.gate_init=best", "gate_init='best' must be 'uniform' or 'importance'"),
    ("koff.importance_spread=8.0", "importance_spread=8.0 must be > 0"),
    ("eval.settings=('kof',)", "unknown settings ['kof']"),
    ("koff.controller=pid", "controller='pid' must be 'projection' or 'lagrangian'"),
    ("koff.log_alpha_clamp=3.0", "log_alpha_clamp=3.0 must be > 4"),
])
def test_bad_override_is_refused_naming_the_key(override, message):
    with pytest.raises(ValueError, match=None) as error:
        config_lib.apply_overrides(config_lib.load_config(CONFIGS / "ci.py"), [override])
    assert message in str(error.value)


def test_config_file_with_unknown_key_is_refused(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from sparsemem.experiment.config import defaults\n"
                    "def get_config():\n    c = defaults()\n    c.train.stpes = 3\n    return c\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['train.stpes'\]"):
        config_lib.load_config(path)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="experiments/configs"):
        config_lib.load_config(tmp_path / "nope.py")


def test_run_directory_refuses_a_different_config_and_reopens_the_same(tmp_path):
    base = config_lib.load_config(CONFIGS / "ci.py")
    RunDir.prepare(tmp_path / "run", base)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["koff"]["target_sparsity"] == base.koff.target_sparsity
    RunDir.prepare(tmp_path / "run", base)  # same config: resume
    other = config_lib.apply_overrides(base, ["koff.target_sparsity=0.06", "train.steps=9"])
    with pytest.raises(ValueError, match=r"different config \(koff.target_sparsity: 0.25 -> 0.06; "
                                         r"train.steps: 4 -> 9\)"):
        RunDir.prepare(tmp_path / "run", other)


def test_variants_map_to_koff_configs():
    config = config_lib.load_config(CONFIGS / "ci.py")
    assert config_lib.koff_config(config, 3, "prune_only").memory_slots == 0
    assert config_lib.koff_config(config, 3, "prune_only").lora_targets == ()
    assert config_lib.koff_config(config, 3, "kv_only").lora_rank == 0
    lora = config_lib.koff_config(config, 3, "lora_only")
    assert lora.memory_slots == 0 and lora.lora_rank == config.koff.lora_rank and lora.num_domains == 3
    assert config_lib.koff_config(config, 3, "dense_memory").target_sparsity == 0.0
    assert config_lib.koff_config(config, 3, "score_mask").has_memory is False
    frozen_early = config_lib.apply_overrides(config, ["koff.gate_fraction=0.5"])
    assert config_lib.koff_config(frozen_early, 3, "koff").gate_fraction == 0.5
    assert config_lib.koff_config(frozen_early, 3, "prune_only").gate_fraction == 1.0  # nothing to train after
    assert config_lib.koff_config(config, 3, "random_mask_memory").has_memory
    assert {config_lib.mask_source(v) for v in config_lib.VARIANTS} == {"gates", "dense", "random", "score"}


@pytest.mark.parametrize("override, message", [("data.unit=sentence", "data.unit"),
                                               ("eval.mc_distractors=hard", "eval.mc_distractors"),
                                               ("train.seeds=0", "train.seeds=0 must be >= 1"),
                                               ("eval.documents=0", "eval.documents=0 must be >= 1")])
def test_new_evaluation_keys_are_validated(override, message):
    config = config_lib.load_config(CONFIGS / "ci.py")
    with pytest.raises(ValueError, match=message):
        config_lib.apply_overrides(config, [override])


def test_a_run_made_before_a_schema_key_existed_resumes_with_its_default(tmp_path):
    base = config_lib.load_config(CONFIGS / "ci.py")
    run = RunDir.prepare(tmp_path / "run", base)
    saved = json.loads(run.config_file.read_text())
    del saved["mesh"]["fsdp"]  # as written by an older sparsemem
    run.config_file.write_text(json.dumps(saved))
    assert run.config().mesh.fsdp == 1
    RunDir.prepare(tmp_path / "run", base)
    with pytest.raises(ValueError, match=r"mesh.fsdp: 1 -> 2"):
        RunDir.prepare(tmp_path / "run", config_lib.apply_overrides(base, ["mesh.fsdp=2"]))
