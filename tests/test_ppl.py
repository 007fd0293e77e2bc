"""The perplexity evaluator equals a direct computation, cuts windows as the protocols say, records inf/NaN, and
gives the same PPL with windows batched (also under every hook intervention, or it stays at batch 1)."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg, plant_super_weight
from omegaconf import OmegaConf

from outlierlab.evals.data import Corpus
from outlierlab.evals.ppl import build_windows, perplexity

TEXT = ["The first document talks about cats.", "", "A second one talks about dogs and birds at length.",
        "Third: numbers 1 2 3 4 5 6 7 8 9 10."]


def protocol(**overrides):
    base = compose_cfg([]).eval.ppl.wikitext2
    return OmegaConf.merge(base, {"windows": None, "seqlen": 16, **overrides})


def test_windows_are_the_joined_text_cut_in_order(tiny_llama):
    corpus = Corpus("toy", "test", TEXT)
    windows = build_windows(protocol(bos="none"), corpus, tiny_llama)
    ids = tiny_llama.tokenizer("\n\n".join(TEXT), add_special_tokens=False)["input_ids"]
    assert windows.ids.shape == (len(ids) // 16, 16)
    assert windows.ids.reshape(-1).tolist() == ids[: windows.ids.numel()]
    with_bos = build_windows(protocol(bos="prepend"), corpus, tiny_llama)
    assert (with_bos.ids[:, 0] == tiny_llama.tokenizer.bos_token_id).all()
    assert with_bos.ids[0, 1:].tolist() == ids[:15]


def test_ppl_equals_direct_computation(tiny_llama):
    windows = build_windows(protocol(bos="prepend"), Corpus("toy", "test", TEXT), tiny_llama)
    result = perplexity(tiny_llama.model, windows, batch_size=2)
    with torch.no_grad():
        logits = tiny_llama.model(windows.ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows.ids[:, 1:].reshape(-1))
    assert math.isclose(result["ppl"], math.exp(nll.item()), rel_tol=1e-5)
    assert result["tokens_scored"] == windows.ids.shape[0] * 15
    hf_losses = [tiny_llama.model(w[None], labels=w[None]).loss.item() for w in windows.ids]
    assert math.isclose(result["nll"], sum(hf_losses) / len(hf_losses), rel_tol=1e-5)


def test_random_windows_are_seeded_and_inside_documents(tiny_llama):
    docs = ["x" * 10, "abcdefghijklmnopqrstuvwxyz" * 3, "short"]
    proto = protocol(sampling="random", windows=4, seed=3, bos="none")
    first = build_windows(proto, Corpus("toy", "validation", docs), tiny_llama)
    again = build_windows(proto, Corpus("toy", "validation", docs), tiny_llama)
    assert torch.equal(first.ids, again.ids)
    text = tiny_llama.tokenizer.decode(first.ids[0])
    assert text in docs[1]


def test_inf_and_nan_are_results(tiny_llama):
    windows = build_windows(protocol(bos="none"), Corpus("toy", "test", TEXT), tiny_llama)
    lm_head = tiny_llama.model.lm_head.weight
    saved = lm_head.data.clone()
    try:
        lm_head.data.fill_(float("nan"))
        assert math.isnan(perplexity(tiny_llama.model, windows)["ppl"])
        lm_head.data.copy_(saved)
        lm_head.data[:, :] = 0
        lm_head.data[0] = 1e6  # every token but 0 gets ~ -1e6 log-probability -> exp overflows
        assert perplexity(tiny_llama.model, windows)["ppl"] == math.inf
    finally:
        lm_head.data.copy_(saved)


LONG_TEXT = [" ".join(f"word{i % 37} and {i * 7 % 11}." for i in range(60)) for _ in range(3)]


def long_windows(loaded, seqlen=24, windows=7):
    return build_windows(protocol(bos="prepend", seqlen=seqlen, windows=windows), Corpus("toy", "test", LONG_TEXT),
                         loaded)


def test_batched_windows_give_the_same_ppl_and_report_throughput(tiny_llama):
    windows = long_windows(tiny_llama)
    one = perplexity(tiny_llama.model, windows, batch_size=1)
    for batch in (3, 7):
        many = perplexity(tiny_llama.model, windows, batch_size=batch)
        assert math.isclose(many["ppl"], one["ppl"], rel_tol=1e-6) and many["ppl"] != 0
        assert many["window_nll"] == pytest.approx(one["window_nll"], rel=1e-6)
        assert many["tokens_scored"] == one["tokens_scored"] and many["batch_size"] == batch
        assert many["tokens_per_s"] > 0 and many["eval_seconds"] > 0


def hook_interventions(loaded):
    """Every intervention that edits activations through hooks, with the context it needs."""
    from outlierlab.interventions.massive_activation import (
        SetMassiveActivations,
        ZeroMedianActivations,
    )
    from outlierlab.interventions.quant import QuantizeActivations, SmoothQuant
    from outlierlab.interventions.super_weight import (
        RestoreSuperActivation,
        ScaleSuperWeights,
    )
    from outlierlab.models.massive import MassiveActivation
    location = MassiveActivation(first_layer=1, channels=(3, 7), positions=(0, 2))
    means = {"locations": [{**location.describe(), "mean": [[[1.5 * layer + p - c for c in range(2)]
                                                              for p in range(2)] for layer in range(4)]}]}
    calibration = long_windows(loaded, windows=2).ids
    ma = {"massive_activations": [location], "ma_means": means}
    return {
        "quantize_activations_tensor_holdout": ([QuantizeActivations(bits=4, holdout=1)], {}),
        "quantize_activations_token": ([QuantizeActivations(bits=4, granularity="token")], {}),
        "ma_zero": ([SetMassiveActivations("zero", layers="all")], ma),
        "ma_mean": ([SetMassiveActivations("mean", layers="first")], ma),
        "zero_median": ([ZeroMedianActivations(layers="all")], ma),
        "restore_sa": ([ScaleSuperWeights(0.0), RestoreSuperActivation()], {"super_weights": [(2, 7, 33)]}),
        "smoothquant": ([SmoothQuant(0.5), QuantizeActivations(bits=4)], {"calibration_ids": calibration}),
    }


@pytest.mark.parametrize("name", ["quantize_activations_tensor_holdout", "quantize_activations_token", "ma_zero",
                                  "ma_mean", "zero_median", "restore_sa", "smoothquant"])
def test_hook_interventions_treat_each_sequence_of_a_batch_on_its_own(tiny_llama, name):
    from outlierlab.interventions.base import EditSession
    plant_super_weight(tiny_llama, layer=2, row=7, col=33)  # a super activation for restore_sa to restore
    windows = long_windows(tiny_llama)
    plain = perplexity(tiny_llama.model, windows)["ppl"]
    interventions, context = hook_interventions(tiny_llama)[name]
    with EditSession(tiny_llama, context) as session:
        session.apply(interventions)
        assert session.batch_invariant
        one = perplexity(tiny_llama.model, windows, batch_size=1)
        many = perplexity(tiny_llama.model, windows, batch_size=7)
    assert one["ppl"] != plain  # the edit does something
    assert math.isclose(many["ppl"], one["ppl"], rel_tol=1e-6)
    assert many["window_nll"] == pytest.approx(one["window_nll"], rel=1e-6)


def test_a_batch_dependent_hook_keeps_evaluation_at_batch_one(tiny_llama):
    """W8A8 with activations=batch takes one activation range over the whole batch tensor: batching would change
    its PPL, so the run context evaluates one window at a time while it is on."""
    from outlierlab.interventions.base import EditSession
    from outlierlab.interventions.fake_quant import W8A8
    from outlierlab.runner import RunContext
    windows = long_windows(tiny_llama)
    with EditSession(tiny_llama) as session:
        session.apply([W8A8(weight_bits=None, activation_bits=3, activations="batch")])
        assert not session.batch_invariant
        one = perplexity(tiny_llama.model, windows, batch_size=1)["ppl"]
        assert not math.isclose(perplexity(tiny_llama.model, windows, batch_size=7)["ppl"], one, rel_tol=1e-6)
    assert session.batch_invariant  # undone
    cfg = compose_cfg(["model=tiny_llama"])
    ctx = RunContext(cfg, tiny_llama, plan=None, corpora={})
    proto = cfg.eval.ppl.wikitext2
    assert ctx.ppl_batch_size(proto) == proto.batch_size > 1
    with ctx.edit([W8A8(weight_bits=None, activation_bits=3, activations="batch")], {}):
        assert ctx.ppl_batch_size(proto) == 1
    assert ctx.ppl_batch_size(proto) == proto.batch_size
