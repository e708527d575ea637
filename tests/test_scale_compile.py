"""`sparsemem compile`: TPU topology names, the v5p-8 AOT fit/FLOPs check, analytic vs traced FLOPs."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sparsemem import cli
from sparsemem.evaluation.scoring import Scorer
from sparsemem.koff.config import KoffConfig
from sparsemem.models.config import preset, to_hf_config
from sparsemem.models.decoder import Decoder
from sparsemem.models.loss import token_cross_entropy
from sparsemem.parallel.mesh import make_mesh
from sparsemem.scale import flops
from sparsemem.train.trainer import KoffTrainer

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu to compile for TPU: pip install 'jax[tpu]'")

# Small enough to compile in seconds, large enough that matrix products dominate; one layer and
# one loss chunk per device, so XLA's loop-agnostic cost analysis is comparable too.
CFG = preset("llama-3.2-1b").replace(num_layers=1, vocab_size=4096, d_model=512, d_ff=1536, num_heads=8,
                                     num_kv_heads=2, head_dim=64)
EVAL_ROWS, EVAL_SEQ_LEN = 8, 512  # the evaluation program's rows: eval.batch_size x eval.seq_len
CONFIG = """
from sparsemem.experiment.config import defaults
def get_config():
    c = defaults()
    c.name = "compile_small"
    c.model.source = "hf"
    c.model.path = {path!r}
    c.data.seq_len = 256
    c.data.batch_size = 8
    c.eval.batch_size = 8
    c.eval.seq_len = 512
    c.koff.memory_slots = 16
    c.koff.lora_rank = 8
    c.koff.loss_chunk = 512
    c.mesh.data = 4
    return c
"""


@needs_libtpu
def test_topology_names():
    from sparsemem.scale.topology import resolve

    for name, chips, hosts, kind in [("v5p-8", 4, 1, "TPU v5"), ("v4-8", 4, 1, "TPU v4"),
                                     ("v5e-16", 16, 4, "TPU v5 lite"), ("v6e-8", 8, 1, "TPU v6 lite"),
                                     ("2xv5p-16", 16, 4, "TPU v5")]:
        topology = resolve(name)
        assert (topology.num_chips, topology.num_hosts, topology.devices[0].device_kind) == (chips, hosts, kind)
    assert resolve("2xv5p-16").num_slices == 2
    with pytest.raises(ValueError, match="accepted: .*v5p-32.*v6e-8"):
        resolve("v5p-12")


@needs_libtpu
def test_compile_v5p_8_fits_and_counts_flops(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(CFG)))
    config = tmp_path / "small.py"
    config.write_text(CONFIG.format(path=str(tmp_path)))
    out = tmp_path / "report.json"
    assert cli.main(["compile", "--config", str(config), "--topology", "v5p-8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| train | 8 x 256 |" in printed and "| eval | 8 x 512 |" in printed and "**no**" not in printed
    report = json.loads(out.read_text())
    assert report["chips"] == 4 and report["fits"]
    kcfg = KoffConfig(num_domains=4, memory_slots=16, lora_rank=8, loss_chunk=512)
    for step in report["steps"]:
        assert 0 < step["peak_bytes"] < report["hbm_bytes"]
        assert step["argument_bytes"] > 0 and step["temp_bytes"] > 0
        analytic = (flops.train_step_flops(CFG, kcfg, 8, 256) if step["name"] == "train" else
                    flops.score_flops(CFG, kcfg, EVAL_ROWS, EVAL_SEQ_LEN))
        assert step["analytic_flops"] == analytic
        assert step["program_flops"] == pytest.approx(analytic, rel=0.1)
        # The compiled executable's own count (per chip) counts each loop body once (the loss's token chunks
        # and vocabulary blocks), so it only bounds the work from below; the exact checks are the program
        # count above and test_analytic_flops_match_the_traced_steps.
        assert 0 < step["xla_flops"] * report["chips"] <= analytic * 1.1
    assert report["largest"][0]["name"] == "backbone.embed"


@pytest.mark.parametrize("change", [{}, dict(remat="full"), dict(remat="dots", lora_targets=("q", "down")),
                                    dict(kl_weight=0.5, remat="full"), dict(accum_steps=2, loss_chunk=300),
                                    dict(memory_slots=0, lora_targets=("q", "v", "o", "gate"))])
def test_analytic_flops_match_the_traced_steps(change):
    cfg = CFG.replace(num_layers=3)
    kcfg = KoffConfig(num_domains=4, memory_slots=16, lora_rank=8, loss_chunk=512).replace(**change)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    trainer = KoffTrainer(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), kcfg, mesh)
    with trainer.backbone.context():
        fn, args = trainer.compilable_step("train", 8, 64)
        train = fn.trace(*args)
        evaluate = Scorer.for_trainer(trainer).trace(8, 64)
    assert flops.jaxpr_flops(train.jaxpr) == flops.train_step_flops(cfg, kcfg, 8, 64)
    assert flops.jaxpr_flops(evaluate.jaxpr) == flops.score_flops(cfg, kcfg, 8, 64)


@pytest.mark.parametrize("logits", [False, True])
def test_analytic_forward_flops_match_the_traced_forward(logits):
    cfg = CFG.replace(num_layers=3)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))

    def forward(state, tokens):
        model = nnx.merge(graphdef, state)
        hidden, _ = model(tokens)
        return token_cross_entropy(model, hidden, tokens, chunk_size=4096) if logits else hidden

    traced = jax.make_jaxpr(forward)(state, jax.ShapeDtypeStruct((2, 64), jnp.int32))
    assert flops.jaxpr_flops(traced) == flops.forward_flops(cfg, 2, 64, logits=logits)
