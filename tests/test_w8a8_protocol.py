"""The W8A8 protocol (interventions/fake_quant.py): per-channel weights and per-token activations by default, the old
per-tensor protocols selectable, and the protocol recorded with every result that quantizes."""
import pytest
import torch
from conftest import compose_cfg

from outlierlab.interventions.base import EditSession
from outlierlab.interventions.fake_quant import W8A8
from outlierlab.interventions.quant import QuantizeActivations, QuantizeWeights


def _loss(loaded, ids):
    with torch.no_grad():
        return float(loaded.model(ids, labels=ids).loss)


def test_per_token_activations_survive_a_massive_activation_that_per_tensor_ranges_do_not(tiny_llama):
    """A planted massive residual channel on one token (an embedding entry) sets the range of every token of the
    tensor under per-tensor RTN; per token, only its own token pays."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12] * 4])
    with EditSession(tiny_llama) as plant:
        plant.set(tiny_llama.sites.module("embed").weight, (5, 3), 3000.0)
        clean = _loss(tiny_llama, ids)
        losses = {}
        for activations in ("token", "tensor", "batch"):
            with EditSession(tiny_llama) as session:
                session.apply([W8A8(weight_bits=8, activation_bits=4, activations=activations)])
                losses[activations] = _loss(tiny_llama, ids)
                assert session.log[-1]["protocol"]["activations"] == f"per_{activations}"
                assert session.batch_invariant == (activations != "batch")
    assert abs(losses["token"] - clean) < abs(losses["tensor"] - clean)
    assert losses["tensor"] == pytest.approx(losses["batch"])  # one sequence: one range either way


@pytest.mark.parametrize("kwargs,key", [({"weights": "row"}, "weights"), ({"activations": "channel"}, "activations")])
def test_bad_w8a8_protocol_is_refused(kwargs, key):
    with pytest.raises(ValueError, match=key):
        W8A8(**kwargs)


def test_quantizers_state_their_protocol():
    assert W8A8().protocol["weights"] == "per_channel" and W8A8().protocol["activations"] == "per_token"
    assert QuantizeWeights(bits=8, block="channel").protocol["weights"] == "per_channel"
    assert QuantizeActivations(granularity="token").protocol["activations"] == "per_token"


def test_the_w8a8_columns_of_the_studies_quantize_activations_per_token():
    for exp in ("ro_gamma", "finetune"):
        interventions = compose_cfg([f"+exp={exp}", "model=tiny_llama"]).exp.interventions
        assert interventions.a8.granularity == "token" and interventions.w8.block == "channel", exp
    assert compose_cfg(["+exp=variants_table"]).exp.w8a8.activations == "token"
