"""A deployment: the compacted backbone plus its domains' memory modules, ready to generate.

An export folder (written by `sparsemem.serve.export_folder`) holds
```
backbone/            config.json (with the layout), model.safetensors, tokenizer.json
modules/<domain>/    manifest.json, memory.safetensors
```
`Deployment.load` refuses modules whose fingerprints differ from the backbone's.
When the backbone has one domain's LoRA merged into its weights, only that domain
is served, with its KV memory (its LoRA is already in the weights). Modules whose
manifests carry routing centroids give a `CentroidRouter`: a row whose domain is
`"auto"` is sent to the memory its prompt is nearest to (`sparsemem.serve.routing`).
Modules exported at another time (e.g. after `sparsemem extend`) load side by side
as long as their fingerprints match the backbone's.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import numpy as np

from sparsemem.checkpoints.hf import load_tokenizer
from sparsemem.checkpoints.memory_module import MemoryModule, ModuleMismatchError, load_memory_module
from sparsemem.serve.backbone import Backbone, load_backbone
from sparsemem.serve.generate import SamplingConfig, generate_ids
from sparsemem.serve.memory import MemoryBank, UnknownDomainError
from sparsemem.serve.routing import CentroidRouter, RoutingError
from sparsemem.tokenizer import Tokenizer

AUTO = "auto"  # the domain name that asks for routing


def centroid_router(modules: Sequence[MemoryModule]) -> CentroidRouter | None:
    """The router over `modules`' centroids, or None if none carries one."""
    if not any(m.centroid is not None for m in modules):
        return None
    missing = [m.domain for m in modules if m.centroid is None]
    layers = {m.routing_layer for m in modules if m.centroid is not None}
    if missing or len(layers) > 1:
        problem = (f"modules {missing} have no routing centroid" if missing
                   else f"centroids come from different layers {sorted(layers)}")
        raise RoutingError(f"cannot route between these modules: {problem}; export them again with the same "
                           "backbone (`sparsemem export --run ...`)")
    return CentroidRouter(tuple(m.domain for m in modules), np.stack([m.centroid for m in modules]), layers.pop())


def stack_modules(modules: Sequence[MemoryModule], drop_lora: bool = False) -> tuple[dict[str, np.ndarray], float]:
    """The modules as one table with a leading domain axis, and their common LoRA scale."""
    layouts = {m.domain: {k: x.shape for k, x in m.arrays.items()} for m in modules}
    if len({str(s) for s in layouts.values()}) > 1:
        raise ModuleMismatchError(f"memory modules differ in shapes and cannot be served together: {layouts}")
    scales = {m.lora_scale for m in modules}
    if len(scales) > 1 and not drop_lora:
        raise ModuleMismatchError(f"memory modules use different LoRA scales {sorted(scales)}")
    names = [k for k in modules[0].arrays if not (drop_lora and k not in ("k", "v"))]
    return {k: np.stack([m.arrays[k] for m in modules]) for k in names}, modules[0].lora_scale


@dataclasses.dataclass
class Deployment:
    backbone: Backbone
    bank: MemoryBank | None
    tokenizer: Tokenizer | None
    router: CentroidRouter | None = None

    @classmethod
    def load(cls, path: str | pathlib.Path, *, offload: bool = False) -> "Deployment":
        """Backbone and every module under `path`; `offload=True` keeps the memory table in host memory."""
        path = pathlib.Path(path)
        backbone = load_backbone(path / "backbone")
        cfg = backbone.model.cfg
        folders = sorted(p for p in (path / "modules").glob("*") if p.is_dir())
        modules = [load_memory_module(p, base_fingerprint=backbone.base_fingerprint,
                                      mask_fingerprint=backbone.mask_fingerprint) for p in folders]
        if backbone.merged_domain is not None:
            modules = [m for m in modules if m.domain == backbone.merged_domain]
        for m in modules:
            m.check_fits(cfg)
        bank = None
        if modules:
            table, scale = stack_modules(modules, drop_lora=backbone.merged_domain is not None)
            bank = MemoryBank(cfg, backbone.layout, [m.domain for m in modules], table, scale, offload=offload)
        tokenizer = load_tokenizer(path / "backbone", cfg) if (path / "backbone" / "tokenizer.json").exists() else None
        return cls(backbone, bank, tokenizer, centroid_router(modules))

    @property
    def domains(self) -> tuple[str, ...]:
        return self.bank.domains if self.bank is not None else ()

    def route(self, prompts: list[list[int]]) -> list[str]:
        """The domain of each prompt (token ids) by nearest centroid."""
        if self.router is None:
            raise RoutingError("this export's module manifests carry no routing centroids; "
                               "export the run again (`sparsemem export --run ...`) to add them, or name the domain")
        return self.router.route(self.backbone.model, prompts, self.backbone.model.cfg.bos_id)

    def resolve_domains(self, prompts: list[list[int]], domains: Sequence[str]) -> list[str]:
        """`domains` with every `"auto"` replaced by the routed domain of its prompt."""
        if len(domains) != len(prompts):
            raise ValueError(f"{len(domains)} domains for {len(prompts)} prompts; give one domain per prompt")
        auto = [i for i, d in enumerate(domains) if d == AUTO]
        routed = dict(zip(auto, self.route([prompts[i] for i in auto]))) if auto else {}
        return [routed.get(i, d) for i, d in enumerate(domains)]

    def generate_ids(self, prompts: list[list[int]], domains: Sequence[str] | None,
                     sampling: SamplingConfig) -> list[list[int]]:
        """Continue prompt `i` with domain `domains[i]`'s memory (`domains=None`: the bare backbone).

        A domain `"auto"` is routed from its prompt (`route`).
        """
        memory = None
        if domains is not None:
            domains = self.resolve_domains(prompts, domains)
            if self.bank is None:
                raise UnknownDomainError(f"unknown domain(s) {sorted(set(domains))}: this export has no memory "
                                         "modules")
            memory = self.bank.rows(domains)
        cfg = self.backbone.model.cfg
        return generate_ids(self.backbone.model, prompts, sampling, memory=memory, pad_id=cfg.pad_id,
                            eos_id=cfg.eos_id)

    def generate_text(self, prompts: list[str], domains: Sequence[str] | None,
                      sampling: SamplingConfig) -> list[str]:
        if self.tokenizer is None:
            raise FileNotFoundError(f"{self.backbone.path} has no tokenizer.json; generate from token ids instead")
        ids = self.generate_ids(self.tokenizer.encode_batch(prompts), domains, sampling)
        return [self.tokenizer.decode(row) for row in ids]
