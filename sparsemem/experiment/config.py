"""Experiment configs: the schema (`defaults()`), loading a config file, overrides, validation.

An experiment is a Python file under `experiments/configs/` whose `get_config()`
returns `defaults()` with some values changed. Every key and value type of a loaded
config is checked against `defaults()` and every override against the loaded config,
before any work starts; errors name the key.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

from sparsemem.evaluation.multiple_choice import TASKS
from sparsemem.evaluation.settings import SETTINGS
from sparsemem.koff.config import KoffConfig

# Without memories nothing trains under a frozen mask, so such a variant's gates train every step.
_NO_MEMORY = {"memory_slots": 0, "lora_rank": 0, "lora_targets": (), "gate_fraction": 1.0}
# Trained variants as KoffConfig changes; where each one's mask comes from is in MASK_SOURCES.
VARIANTS = {
    "koff": {},
    "prune_only": _NO_MEMORY,
    "lora_only": {"memory_slots": 0},
    "kv_only": {"lora_rank": 0, "lora_targets": ()},
    "dense_memory": {"target_sparsity": 0.0},  # its metrics and export say 0%: the mask is all ones
    "random_mask": _NO_MEMORY,
    "random_mask_memory": {},
    "score_mask": _NO_MEMORY,
    "score_mask_memory": {},
    # Sequential ablation in KOFF's budget: the first half of the steps train the gates without memories,
    # the second half only the memories under the mask they froze to.
    "prune_then_memory": {"joint": False, "gate_fraction": 0.5},
    # KOFF from a fixed start whatever `koff.gate_init` says: the study's comparison of the two starts.
    "koff_uniform": {"gate_init": "uniform"},
    "koff_importance": {"gate_init": "importance"},
}
# A variant's mask: "gates" (its own, trained), "dense" (all ones: memories on the unpruned model),
# "random" (random structured mask at the target) or "score" (Taylor gate scores on calibration
# batches; sparsemem/koff/baselines.py). A fixed mask trains only the memory; without memory, nothing.
MASK_SOURCES = {"dense_memory": "dense", "random_mask": "random", "random_mask_memory": "random",
                "score_mask": "score", "score_mask_memory": "score"}


def mask_source(variant: str) -> str:
    return MASK_SOURCES.get(variant, "gates")


def trains_gates(variant: str) -> bool:
    """Whether `variant` learns its own mask (the others train, if anything, only memory under a fixed one)."""
    return mask_source(variant) == "gates"
# KoffConfig fields the experiment derives itself.
_DERIVED_KOFF = ("num_domains", "total_steps")


def defaults() -> ml_collections.ConfigDict:
    """Every key an experiment config may set, with its default value (and hence type)."""
    c = ml_collections.ConfigDict()
    c.name = "experiment"
    c.model = dict(
        source="demo",  # "demo": embedded Gemma-3-270M; "hf": the folder `path`; "random": `random` dims, demo tokenizer
        path="",
        param_dtype="float32",
        random=dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128, seed=0),
    )
    c.data = dict(
        corpus="libreoffice_help",  # "folder" (one sub-folder/file per domain, docs/data.md) or "wiki40b"
        languages=("en-US", "de", "ja", "ru"),  # help-corpus or wiki40b language codes; unused for "folder"
        folder="",
        data_dir="",  # TFDS data dir; "" = the TFDS default
        unit="page",  # help corpus: "page" (whole pages, for training and perplexity) or "paragraph"
        seq_len=128,
        batch_size=4,
        seed=0,
    )
    koff = {f.name: f.default for f in dataclasses.fields(KoffConfig) if f.name not in _DERIVED_KOFF}
    c.koff = koff
    c.train = dict(
        steps=100,
        variants=("koff", "prune_only"),  # trained separately; must include "koff"
        seeds=1,  # train and evaluate every variant this many times (seeds data.seed, data.seed+1, ...)
        calibration_batches=8,  # training batches the score-based mask's Taylor scores average over
        save_every=25,
        log_every=5,
    )
    c.eval = dict(
        split="validation",  # tune and sweep on "validation"; the final report reads "test"
        documents=32,  # held-out documents (pages) per domain for perplexity and its intervals
        paragraphs=64,  # held-out aligned paragraphs per domain for the memory-swap matrix
        resamples=2000,  # bootstrap resamples of the documents (questions) for every 95% interval
        batch_size=4,
        # Rows of held-out text: a longer document is scored in windows that carry the `context`
        # tokens before their first scored target (training's data.seq_len is a compute budget,
        # not the model's context; cutting evaluation there scored half the demo's tokens blind).
        seq_len=1024,
        context=256,
        mc_questions=16,  # multiple-choice questions per domain and task (0: skip)
        mc_distractors="same_page",  # "same_page": from the answer's page first, then nearest in length; "random"
        mc_tasks=("continuation", "translation"),  # translation: from the first language (aligned corpora only)
        mc_prompt_tokens=24,
        mc_continuation_tokens=16,
        mc_settings=("dense", "pruned", "pruned_retrained", "koff"),
        settings=(),  # settings scored for perplexity (sparsemem/evaluation/settings.py); () = every computable one
    )
    c.analysis = dict(
        enabled=True,
        tokens=50_000,  # held-out tokens per domain for activation statistics (or all the split has)
        specific_fraction=0.05,  # lowest-LAPE fraction of (active) neurons called language-specific
        min_activation_quantile=0.5,  # neurons whose max activation prob. is below this quantile are not candidates
        permutations=1000,
    )
    # `sparsemem study` (sparsemem/experiment/study.py): the experiment at each of these training budgets
    # (train.steps) x train.seeds seeds, one report; () for a plain `sparsemem run`.
    c.study = dict(budgets=())
    # Devices per mesh axis (their product is the number of devices used); `distributed` calls
    # jax.distributed.initialize() first (multi-host TPU slices).
    c.mesh = dict(data=1, fsdp=1, model=1, distributed=False)
    return c


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of the Python file at `path`, checked against `defaults()`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found; configs live in experiments/configs/*.py")
    spec = importlib.util.spec_from_file_location(f"sparsemem_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config() returning an ml_collections.ConfigDict")
    config = module.get_config()
    check_against(flatten(config), flatten(defaults()), f"config file {path}")
    validate(config)
    return config


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
    """`{"a.b.c": value}` of every leaf."""
    out = {}
    for key, value in (config.items() if isinstance(config, (dict, ml_collections.ConfigDict)) else ()):
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number" if isinstance(value, float) else "int"
    if isinstance(value, (tuple, list)):
        return "sequence"
    return type(value).__name__


def _fits(value: Any, reference: Any) -> bool:
    kind, want = _kind(value), _kind(reference)
    return kind == want or (want == "number" and kind == "int")


def check_against(values: dict[str, Any], reference: dict[str, Any], where: str) -> None:
    """Refuse keys missing from `reference` and values whose type differs from the reference value's."""
    unknown = sorted(set(values) - set(reference))
    if unknown:
        raise ValueError(f"{where}: unknown config key(s) {unknown}; known keys: {sorted(reference)}")
    wrong = [f"{k}={values[k]!r} ({_kind(values[k])}, expected {_kind(reference[k])} like {reference[k]!r})"
             for k in values if not _fits(values[k], reference[k])]
    if wrong:
        raise ValueError(f"{where}: wrong value type for " + "; ".join(wrong))


def parse_override(text: str) -> tuple[str, Any]:
    """`"koff.target_sparsity=0.06"` -> `("koff.target_sparsity", 0.06)`; non-literals stay strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r} is not KEY=VALUE (e.g. koff.target_sparsity=0.06)")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(value, list):
        value = tuple(value)
    return key.strip(), value


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """A copy of `config` with `KEY=VALUE` overrides applied, each checked against the config's keys and types."""
    config = ml_collections.ConfigDict(config.to_dict())
    flat = flatten(config)
    parsed = dict(parse_override(o) for o in overrides)
    check_against(parsed, flat, "override")
    for key, value in parsed.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        if isinstance(flat[key], float):
            value = float(value)
        with node.ignore_type():
            node[leaf] = value
    validate(config)
    return config


def koff_config(config: ml_collections.ConfigDict, num_domains: int, variant: str = "koff") -> KoffConfig:
    """The `KoffConfig` of one trained variant of the experiment."""
    fields = dict(config.koff.to_dict())
    fields["lora_targets"] = tuple(fields["lora_targets"])
    fields.update(VARIANTS[variant])
    return KoffConfig(num_domains=num_domains, total_steps=config.train.steps, **fields)


def validate(config: ml_collections.ConfigDict) -> None:
    """Value checks beyond types; raises one error listing every problem."""
    problems = []
    c = config
    if c.model.source not in ("demo", "hf", "random"):
        problems.append(f"model.source={c.model.source!r} must be 'demo', 'hf' or 'random'")
    if c.model.source == "hf" and not c.model.path:
        problems.append("model.source='hf' needs model.path (a Hugging Face folder)")
    if c.data.corpus not in ("libreoffice_help", "folder", "wiki40b"):
        problems.append(f"data.corpus={c.data.corpus!r} must be 'libreoffice_help', 'folder' or 'wiki40b'")
    if c.data.corpus == "folder" and not c.data.folder:
        problems.append("data.corpus='folder' needs data.folder")
    if c.data.corpus != "folder" and len(c.data.languages) < 2:
        problems.append(f"data.languages={tuple(c.data.languages)} needs at least two languages")
    if len(set(c.data.languages)) != len(c.data.languages):
        problems.append(f"data.languages={tuple(c.data.languages)} names a language twice")
    if c.data.unit not in ("page", "paragraph"):
        problems.append(f"data.unit={c.data.unit!r} must be 'page' or 'paragraph'")
    if c.eval.mc_distractors not in ("same_page", "random"):
        problems.append(f"eval.mc_distractors={c.eval.mc_distractors!r} must be 'same_page' or 'random'")
    unknown = sorted(set(c.train.variants) - set(VARIANTS))
    if unknown or "koff" not in c.train.variants:
        problems.append(f"train.variants={tuple(c.train.variants)} must include 'koff' and only {sorted(VARIANTS)}")
    bad = sorted(set(c.eval.mc_settings) - set(SETTINGS))
    if bad:
        problems.append(f"eval.mc_settings has unknown settings {bad}; choose from {sorted(SETTINGS)}")
    bad = sorted(set(c.eval.settings) - set(SETTINGS))
    if bad:
        problems.append(f"eval.settings has unknown settings {bad}; choose from {sorted(SETTINGS)}")
    bad = sorted(set(c.eval.mc_tasks) - set(TASKS))
    if bad:
        problems.append(f"eval.mc_tasks has unknown tasks {bad}; choose from {TASKS}")
    if c.eval.split not in ("validation", "test"):
        problems.append(f"eval.split={c.eval.split!r} must be 'validation' or 'test'")
    for key in ("data.seq_len", "data.batch_size", "train.steps", "train.log_every", "train.seeds",
                "train.calibration_batches", "eval.documents", "eval.paragraphs", "eval.batch_size", "eval.resamples",
                "eval.seq_len",
                "analysis.tokens", "analysis.permutations", "mesh.data", "mesh.fsdp", "mesh.model"):
        if flatten(c)[key] < 1:
            problems.append(f"{key}={flatten(c)[key]} must be >= 1")
    if any(not isinstance(b, int) or b < 1 for b in c.study.budgets):
        problems.append(f"study.budgets={tuple(c.study.budgets)} must be training step counts >= 1")
    if c.train.save_every < 0:
        problems.append(f"train.save_every={c.train.save_every} must be >= 0 (0: save only at the end)")
    if not 0 <= c.eval.context <= c.eval.seq_len - 2:
        problems.append(f"eval.context={c.eval.context} must be in [0, eval.seq_len - 2]: a window holds BOS, the "
                        "context and at least one scored target")
    if c.eval.mc_prompt_tokens + c.eval.mc_continuation_tokens + 1 > c.data.seq_len:
        problems.append("eval.mc_prompt_tokens + eval.mc_continuation_tokens + 1 must fit data.seq_len")
    if not 0.0 < c.analysis.specific_fraction < 1.0:
        problems.append(f"analysis.specific_fraction={c.analysis.specific_fraction} must be in (0, 1)")
    if problems:
        raise ValueError("Invalid experiment config: " + "; ".join(problems))
    try:
        koff_config(c, num_domains=2)
    except ValueError as error:
        raise ValueError(f"Invalid experiment config (koff.*): {error}") from None


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two flattened configs (`key: a -> b`)."""
    norm = lambda v: list(v) if isinstance(v, (tuple, list)) else v  # noqa: E731
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if norm(a.get(k)) != norm(b.get(k))]
