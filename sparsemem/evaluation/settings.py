"""The evaluated settings: which mask and which memory modules a forward pass uses.

A setting names a trained variant for its mask and one for its memory table (see
`sparsemem.experiment.config.VARIANTS`). "LoRA only" and "KV only" use their own
separately trained variants when the run trained them; otherwise the KOFF run's
table with the other component left out (marked "(from KOFF)").
"""

from __future__ import annotations

import dataclasses

SETTINGS = ("dense", "dense_memory", "pruned", "pruned_retrained", "pruned_lora", "pruned_kv", "prune_then_memory", "koff",
            "koff_uniform", "koff_importance", "random_mask", "random_mask_memory", "score_mask", "score_mask_memory")
# Variants evaluated as themselves (their own mask and memory): label.
_AS_TRAINED = {"koff_uniform": "KOFF, uniform gate start", "koff_importance": "KOFF, importance gate start",
               "random_mask": "random mask, no memories", "random_mask_memory": "random mask + memories",
               "score_mask": "Taylor-score mask, no memories", "score_mask_memory": "Taylor-score mask + memories"}


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    label: str
    mask: str | None  # variant whose deterministic mask is applied; None: dense
    memory: str | None  # variant whose memory table is used; None: no memory
    parts: tuple[str, ...] = ("kv", "lora")  # memory components used


def resolve(variants: tuple[str, ...] | list[str], only: tuple[str, ...] | list[str] = ()) -> dict[str, Setting]:
    """The settings computable from the trained `variants`, in `SETTINGS` order (those in `only`, if given;
    "koff" always: the memory swap reads it)."""
    settings = _computable(variants)
    unknown = sorted(set(only) - set(SETTINGS))
    if unknown:
        raise ValueError(f"eval.settings names unknown settings {unknown}; choose from {SETTINGS}")
    return {name: s for name, s in settings.items() if not only or name in only or name == "koff"}


def _computable(variants: tuple[str, ...] | list[str]) -> dict[str, Setting]:
    out = {
        "dense": Setting("dense", "dense", None, None),
        "dense_memory": (Setting("dense_memory", "dense + memories (trained unpruned)", "dense_memory", "dense_memory")
                         if "dense_memory" in variants else
                         Setting("dense_memory", "dense + KOFF's memories (trained under the mask)", None, "koff")),
        "pruned": Setting("pruned", "KOFF mask, no memories", "koff", None),
    }
    if "prune_only" in variants:
        out["pruned_retrained"] = Setting("pruned_retrained", "pruned, trained without memories", "prune_only", None)
    out["pruned_lora"] = (Setting("pruned_lora", "pruned + LoRA only", "lora_only", "lora_only")
                          if "lora_only" in variants else
                          Setting("pruned_lora", "pruned + LoRA only (from KOFF)", "koff", "koff", ("lora",)))
    out["pruned_kv"] = (Setting("pruned_kv", "pruned + KV memory only", "kv_only", "kv_only")
                        if "kv_only" in variants else
                        Setting("pruned_kv", "pruned + KV memory only (from KOFF)", "koff", "koff", ("kv",)))
    if "prune_then_memory" in variants:
        out["prune_then_memory"] = Setting("prune_then_memory", "pruned first, then LoRA + KV on that mask",
                                           "prune_then_memory", "prune_then_memory")
    out["koff"] = Setting("koff", "pruned + LoRA + KV memory (KOFF)", "koff", "koff")
    for name, label in _AS_TRAINED.items():
        if name in variants:
            out[name] = Setting(name, label, name, None if name in ("random_mask", "score_mask") else name)
    return out


def memory_parts(table: dict, parts: tuple[str, ...]) -> dict:
    """The arrays of a memory table that belong to `parts` ("kv": `k`, `v`; "lora": `*_a`, `*_b`)."""
    keep = lambda name: ("kv" in parts and name in ("k", "v")) or ("lora" in parts and name[-2:] in ("_a", "_b"))  # noqa: E731
    return {name: x for name, x in table.items() if keep(name)}
