"""Routing: centroids in manifests, exact routing of a separable case, per-row `auto` in mixed batches, refusals."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from sparsemem.checkpoints.memory_module import load_memory_module
from sparsemem.koff.memory import hooks_from_rows
from sparsemem.models.hooks import Hooks
from sparsemem.models.layers import segment_positions
from sparsemem.models.loss import token_cross_entropy
from sparsemem.experiment.report import routing_tables
from sparsemem.experiment.route import evaluate_routing
from sparsemem.serve import routing
from sparsemem.serve.deploy import Deployment, centroid_router
from sparsemem.serve.export_folder import export
from sparsemem.serve.generate import SamplingConfig
from test_serve_compact import DOMAINS, SLOTS, hard_masks, random_decoder, random_table, tiny

SCALE = 0.7
BOS = 2
# Each domain writes with its own four tokens: a separable case by construction.
VOCAB = {"en": (10, 14), "de": (60, 64), "fr": (110, 114)}


def documents(domain, count, length, seed):
    rng = np.random.default_rng(seed)
    low, high = VOCAB[domain]
    return [[BOS] + rng.integers(low, high, length - 1).tolist() for _ in range(count)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = tiny("gemma3")
    decoder, masks, table = random_decoder(cfg), hard_masks(cfg), random_table(cfg)
    texts = {d: documents(d, 12, 24, seed=i) for i, d in enumerate(DOMAINS)}
    out = export(decoder, masks, table, DOMAINS, SCALE, tmp_path_factory.mktemp("export"), routing_texts=texts,
                 routing_layer=1)
    return decoder, masks, table, out


def test_centroids_are_stored_in_manifests_and_equal_the_mean_document_feature(exported):
    _, _, _, out = exported
    deployment = Deployment.load(out)
    model = deployment.backbone.model
    for i, domain in enumerate(DOMAINS):
        module = load_memory_module(out / "modules" / domain)
        assert module.routing_layer == 1
        manifest = json.loads((out / "modules" / domain / "manifest.json").read_text())
        np.testing.assert_array_equal(np.asarray(manifest["routing"]["centroid"], np.float32), module.centroid)
        # One document at a time, unpadded: the centroid does not depend on batching or padding.
        alone = [routing.prompt_features(model, [doc], 1, BOS)[0] for doc in documents(domain, 12, 24, seed=i)]
        np.testing.assert_allclose(module.centroid, np.mean(alone, 0), rtol=1e-5, atol=1e-6)


def test_prefix_features_equal_features_of_the_truncated_prompt(exported):
    """Causality: the mean over the first n tokens of a long prompt is the feature of its n-token prefix."""
    model = Deployment.load(exported[3]).backbone.model
    doc = documents("de", 1, 40, seed=7)[0]
    tokens, segments = routing.pad_right([doc], model.cfg.pad_id)
    feats = routing.token_features(model, tokens, segments, 1)
    for n in (8, 16, 33):
        prefix = routing.prefix_means(feats, tokens, segments, np.asarray([n]), BOS)[0]
        np.testing.assert_allclose(prefix, routing.prompt_features(model, [doc[:n]], 1, BOS)[0], rtol=1e-5,
                                   atol=1e-6)


def test_centroid_router_is_exact_on_a_separable_case(exported):
    deployment = Deployment.load(exported[3])
    held_out = [(d, doc) for i, d in enumerate(DOMAINS) for doc in documents(d, 10, 16, seed=100 + i)]
    routed = deployment.route([doc for _, doc in held_out])
    assert routed == [d for d, _ in held_out]


def test_centroid_scores_are_minus_squared_distances():
    rng = np.random.default_rng(0)
    centroids, features = rng.standard_normal((5, 7)), rng.standard_normal((9, 7))
    router = routing.CentroidRouter(tuple("abcde"), centroids, layer=0)
    want = -((features[:, None] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_allclose(router.scores(features), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(routing.RoutingError, match="4 centroids for 5 domains"):
        routing.CentroidRouter(tuple("abcde"), centroids[:4], layer=0)


def test_likelihood_scores_equal_the_masked_model_with_memory(exported):
    """The reference router's token losses are the run's own loss (masked decoder + hooks), per domain."""
    decoder, masks, table, out = exported
    deployment = Deployment.load(out)
    prompts = documents("en", 2, 13, seed=1) + documents("fr", 1, 9, seed=2)
    tokens, segments = routing.pad_right(prompts, decoder.cfg.pad_id)
    nll = routing.nll_under_each_domain(deployment.backbone.model, deployment.bank, tokens, segments)
    for d, name in enumerate(deployment.domains):
        ids = jnp.full((len(prompts),), DOMAINS.index(name))
        memory = hooks_from_rows({k: jnp.asarray(v) for k, v in table.items()}, ids, SCALE)
        hooks = Hooks(head_scale=jnp.asarray(masks["head"]), neuron_scale=jnp.asarray(masks["neuron"]),
                      memory_k=memory.memory_k, memory_v=memory.memory_v, lora=memory.lora)
        seg = jnp.asarray(segments)
        hidden, _ = decoder(jnp.asarray(tokens), hooks=hooks, segment_ids=seg,
                            positions=segment_positions(seg) + SLOTS)
        want = token_cross_entropy(decoder, hidden[:, :-1], jnp.asarray(tokens[:, 1:])) * (segments[:, 1:] > 0)
        np.testing.assert_allclose(nll[d], np.asarray(want), rtol=2e-4, atol=2e-5)
    likelihood = routing.LikelihoodRouter(deployment.bank).route(deployment.backbone.model, prompts)
    assert likelihood == [deployment.domains[i] for i in nll.sum(-1).argmin(0)]


def test_auto_routes_each_row_of_a_mixed_batch(exported):
    deployment = Deployment.load(exported[3])
    prompts = documents("fr", 1, 20, seed=3) + documents("en", 1, 11, seed=4) + documents("de", 1, 17, seed=5)
    domains = ["auto", "de", "auto"]
    resolved = deployment.resolve_domains(prompts, domains)
    assert resolved == ["fr", "de", "de"]
    # Each routed row gets what it gets alone, and generation equals naming the routed domains.
    assert [deployment.route([p])[0] for p in prompts] == ["fr", "en", "de"]
    sampling = SamplingConfig(max_new_tokens=4)
    assert deployment.generate_ids(prompts, domains, sampling) == deployment.generate_ids(prompts, resolved, sampling)


def test_modules_without_centroids_are_refused_for_routing(exported, tmp_path):
    decoder, masks, table, _ = exported
    plain = export(decoder, masks, table, DOMAINS, SCALE, tmp_path / "plain")
    deployment = Deployment.load(plain)
    with pytest.raises(routing.RoutingError, match="no routing centroids.*export the run again"):
        deployment.generate_ids([[BOS, 12]], ["auto"], SamplingConfig(max_new_tokens=2))
    # Mixing modules with and without centroids names the ones that lack them.
    with_centroids = load_memory_module(exported[3] / "modules" / "en")
    without = load_memory_module(plain / "modules" / "de")
    with pytest.raises(routing.RoutingError, match=r"modules \['de'\] have no routing centroid"):
        centroid_router([with_centroids, without])


def test_route_evaluation_on_a_separable_case(exported):
    deployment = Deployment.load(exported[3])
    sequences = {d: documents(d, 3, 24, seed=200 + i) for i, d in enumerate(DOMAINS)}
    result = evaluate_routing(deployment, sequences, lengths=(8, 16), ppl_prompt=8, batch_size=2)
    assert [result["accuracy"]["centroid"][n]["mean"] for n in ("8", "16")] == [1.0, 1.0]
    assert result["perplexity"]["routed"] == result["perplexity"]["oracle"]  # every prompt found its memory
    for kind in ("centroid", "likelihood"):
        assert np.sum(result["confusion"][kind]["16"], 1).tolist() == [3, 3, 3]
    # The swap matrix is each domain's mean token loss under every memory, computed here one memory at a time.
    model, bank = deployment.backbone.model, deployment.bank
    for t, domain in enumerate(result["domains"]):
        tokens, segments = routing.pad_right(sequences[domain], model.cfg.pad_id)
        for m, memory in enumerate(result["memories"]):
            nll = routing.token_nll(model, tokens, segments, bank.rows([memory] * 3))
            np.testing.assert_allclose(result["swap"][t][m], np.exp(nll.sum() / (segments[:, 1:] > 0).sum()),
                                       rtol=1e-5)
    assert 0 < result["cost"]["centroid_share"] and result["cost"]["generated_tokens"] == 64
    assert "| centroid | 100.0% | 100.0% |" in routing_tables(result)
