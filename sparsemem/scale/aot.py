"""Ahead-of-time compilation of KOFF's train step and evaluation program for a TPU topology, without weights.

The decoder is built abstractly (`nnx.eval_shape`), the trainer on a mesh of the
topology's compile-only devices; `KoffTrainer.compilable_step` gives the jitted train step
and `Scorer.trace` the evaluation program (the very functions a run executes, same shardings
and donation) traced on abstract arguments, which are lowered and compiled by libtpu. Memory comes from the compiled executable, FLOPs from the traced
program (see `flops`), both against the chip's HBM and peak throughput.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from sparsemem.evaluation.scoring import Scorer
from sparsemem.koff.config import KoffConfig
from sparsemem.models.config import ModelConfig
from sparsemem.models.decoder import Decoder
from sparsemem.parallel.mesh import make_mesh
from sparsemem.scale import flops as flops_lib
from sparsemem.scale.topology import Topology
from sparsemem.train.trainer import KoffTrainer

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class StepCost:
    name: str  # "train" | "eval" (the `Scorer` program a run evaluates every setting with)
    batch: int  # global rows
    seq_len: int
    argument_bytes: int  # per chip
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated arguments
    temp_bytes: int
    program_flops: int  # global matmul FLOPs of the traced step (rematerialisation included)
    analytic_flops: int  # the same, counted from the configs
    model_flops: int  # analytic, without rematerialisation: what MFU is quoted against
    xla_flops: float  # per chip, XLA's cost analysis of the compiled step: counts each loop body once

    @property
    def peak_bytes(self) -> int:
        """Per-chip bytes live at the step's peak: arguments + outputs not aliased to them + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass(frozen=True)
class ArrayPlacement:
    name: str
    shape: tuple[int, ...]
    dtype: str
    spec: PartitionSpec
    chip_bytes: int  # bytes of one shard


@dataclasses.dataclass(frozen=True)
class CompileReport:
    topology: Topology
    mesh: dict[str, int]
    cfg: ModelConfig
    kcfg: KoffConfig
    param_dtype: str
    steps: tuple[StepCost, ...]
    largest: tuple[ArrayPlacement, ...]  # arguments of the train step, largest shard first

    @property
    def fits(self) -> bool:
        return all(step.peak_bytes <= self.topology.hbm_bytes for step in self.steps)


def _largest(tree, count: int) -> tuple[ArrayPlacement, ...]:
    placements = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shard = leaf.sharding.shard_shape(leaf.shape)
        name = jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")
        placements.append(ArrayPlacement(name, tuple(leaf.shape), jnp.dtype(leaf.dtype).name,
            leaf.sharding.spec, math.prod(shard) * jnp.dtype(leaf.dtype).itemsize))
    return tuple(sorted(placements, key=lambda p: -p.chip_bytes)[:count])


def _step_cost(traced: jax.stages.Traced, name: str, rows: int, seq_len: int, analytic: int, model: int) -> StepCost:
    compiled = traced.lower().compile()
    memory = compiled.memory_analysis()
    return StepCost(name, rows, seq_len, memory.argument_size_in_bytes, memory.output_size_in_bytes,
                    memory.alias_size_in_bytes, memory.temp_size_in_bytes, flops_lib.jaxpr_flops(traced.jaxpr),
                    analytic, model, float(compiled.cost_analysis().get("flops", math.nan)))


def compile_koff(cfg: ModelConfig, kcfg: KoffConfig, topology: Topology, mesh_shape: dict[str, int], *,
                 batch: int, seq_len: int, eval_batch: int, eval_seq_len: int, param_dtype: str = "float32",
                 largest: int = 8) -> CompileReport:
    """Compile the train step for global batches of `batch` x `seq_len` tokens and the evaluation program
    for `eval_batch` x `eval_seq_len` targets."""
    if math.prod(mesh_shape.values()) != topology.num_chips:
        raise ValueError(f"mesh {mesh_shape} has {math.prod(mesh_shape.values())} devices but {topology.name} has "
                         f"{topology.num_chips} chips; make the mesh axes multiply to {topology.num_chips}")
    try:
        mesh = make_mesh(mesh_shape, devices=topology.devices)
    except NotImplementedError as error:  # jax's device assignment cannot split physical axes
        raise ValueError(f"mesh {mesh_shape} cannot be laid out on {topology.name}'s physical "
                         f"{'x'.join(map(str, topology.shape))} chips: each mesh axis must be a product of "
                         f"physical axis sizes, assigned in order; reorder or resize the axes ({error})") from None
    decoder = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(param_dtype)))
    trainer = KoffTrainer(decoder, kcfg, mesh)
    with trainer.backbone.context():
        step, args = trainer.compilable_step("train", batch, seq_len)
        train = _step_cost(step.trace(*args), "train", batch, seq_len,
                           flops_lib.train_step_flops(cfg, kcfg, batch, seq_len),
                           flops_lib.train_step_flops(cfg, kcfg, batch, seq_len, recompute=False))
        eval_flops = flops_lib.score_flops(cfg, kcfg, eval_batch, eval_seq_len)
        evaluate = _step_cost(Scorer.for_trainer(trainer).trace(eval_batch, eval_seq_len), "eval", eval_batch,
                              eval_seq_len, eval_flops, eval_flops)
    return CompileReport(topology, dict(mesh.shape), cfg, kcfg, param_dtype, (train, evaluate),
                         _largest({"state": trainer.abstract_state, "backbone": trainer.backbone.params}, largest))


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _flops(n: float) -> str:
    for scale, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g}"


def _seconds(s: float) -> str:
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def as_dict(report: CompileReport) -> dict:
    """The report as JSON-ready values (`sparsemem compile --json`)."""
    t = report.topology
    return dict(topology=t.name, chips=t.num_chips, hosts=t.num_hosts, hbm_bytes=t.hbm_bytes,
                peak_flops=t.peak_flops, mesh=report.mesh, fits=report.fits,
                steps=[dict(dataclasses.asdict(s), peak_bytes=s.peak_bytes) for s in report.steps],
                largest=[dict(name=p.name, shape=p.shape, dtype=p.dtype, spec=str(tuple(p.spec)),
                              chip_bytes=p.chip_bytes) for p in report.largest])


def format_report(report: CompileReport, step_time: float | None = None) -> str:
    """Markdown tables: per-chip memory vs HBM, FLOPs and the MFU bound, the largest arrays' shardings."""
    t, c, k = report.topology, report.cfg, report.kcfg
    lines = [
        f"**{t.name}** ({t.jax_name}, {t.num_slices} slice(s)): {t.num_chips} chips on {t.num_hosts} hosts, "
        f"{t.hbm_bytes / 1e9:.0f} GB HBM and {t.peak_flops / 1e12:.0f} TFLOP/s (bf16) per chip; "
        f"mesh {', '.join(f'{a}={n}' for a, n in report.mesh.items())}",
        f"model d={c.d_model} L={c.num_layers} H={c.num_heads}/{c.num_kv_heads} F={c.d_ff} V={c.vocab_size}, "
        f"params {report.param_dtype}, compute {k.compute_dtype}, remat {k.remat}, accum {k.accum_steps}; "
        f"{k.num_domains} domains, {k.memory_slots} memory slots, LoRA r={k.lora_rank} on {','.join(k.lora_targets)}",
        "",
        "| step | batch x seq | arguments GiB | outputs GiB | temporaries GiB | peak GiB / HBM GiB | fits "
        "| FLOP/step (program) | analytic | XLA FLOP/chip* | "
        + (f"MFU at {step_time:g} s |" if step_time else "step time at 100% MFU |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report.steps:
        ok = "yes" if s.peak_bytes <= t.hbm_bytes else "**no**"
        bound = s.model_flops / (t.num_chips * t.peak_flops)
        last = f"{100 * bound / step_time:.1f}%" if step_time else _seconds(bound)
        lines.append(
            f"| {s.name} | {s.batch} x {s.seq_len} | {_gib(s.argument_bytes)} | "
            f"{_gib(s.output_bytes - s.alias_bytes)} | {_gib(s.temp_bytes)} | "
            f"{_gib(s.peak_bytes)} / {_gib(t.hbm_bytes)} | {ok} | {_flops(s.program_flops)} | "
            f"{_flops(s.analytic_flops)} | {_flops(s.xla_flops)} | {last} |")
    lines += ["", "\\* XLA's cost analysis counts each loop body (layer scan, micro-batches, loss chunks) once; "
              "the program count multiplies them out. MFU uses the analytic model FLOPs (no rematerialisation).",
              "", "| largest arrays (train step) | shape | dtype | sharding | GiB per chip |", "|---|---|---|---|---|"]
    lines += [f"| {p.name} | {'x'.join(map(str, p.shape))} | {p.dtype} | {tuple(p.spec)} | {_gib(p.chip_bytes)} |"
              for p in report.largest]
    if not report.fits:
        worst = max(report.steps, key=lambda s: s.peak_bytes)
        parts = {"arguments (weights and state)": worst.argument_bytes, "temporaries (activations)": worst.temp_bytes}
        top = max(parts, key=parts.get)
        lines += ["", f"DOES NOT FIT: the {worst.name} step needs {_gib(worst.peak_bytes)} GiB per chip, HBM is "
                  f"{_gib(t.hbm_bytes)} GiB; {top} dominate ({_gib(parts[top])} GiB). "
                  + ("Shard the weights (mesh fsdp/model) or use bfloat16 params." if top.startswith("arg") else
                     "Lower the batch, raise accum_steps or use remat='full'.")]
    return "\n".join(lines)
