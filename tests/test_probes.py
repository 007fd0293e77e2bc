"""Streaming probes equal a single-pass computation and keep no activations."""
import pytest
import torch
from conftest import plant_super_weight

from outlierlab.models.massive import MassiveActivation
from outlierlab.probes.activation_means import ActivationMeans
from outlierlab.probes.attention import AttentionSinks
from outlierlab.probes.moments import SiteMoments
from outlierlab.probes.stats import DownProjStats, ResidualStats


def test_residual_stats_stream_equals_one_pass(tiny_llama):
    torch.manual_seed(0)
    batches = [torch.randint(0, 256, (2, 24)) for _ in range(3)]
    with ResidualStats(tiny_llama.sites, k=3) as stats:
        for batch in batches:
            stats.observe(batch)
            tiny_llama.model(batch)
    everything = torch.cat(batches)
    hidden = {}  # one pass over all sequences, keeping whole activations (what the probe must avoid)
    with tiny_llama.sites.hooks(tiny_llama.sites.per_layer("layers.{i}.out",
                                                           lambda i: lambda h: hidden.__setitem__(i, h.clone()))):
        tiny_llama.model(everything)
    for layer, summary in enumerate(stats.summary()):
        magnitude = hidden[layer].abs()
        per_sequence = magnitude.reshape(magnitude.shape[0], -1)
        expected_topk = per_sequence.topk(3, dim=1).values.double().mean(dim=0)
        assert torch.allclose(torch.tensor(summary["mean_topk"], dtype=torch.float64), expected_topk, rtol=1e-5)
        assert abs(summary["mean_median"] - per_sequence.median(dim=1).values.double().mean().item()) < 1e-5
        best = summary["top"][0]
        assert abs(best["abs"] - magnitude.max().item()) < 1e-4
        assert magnitude[best["sequence"], best["position"], best["channel"]] == magnitude.max()
        assert best["token"] == int(everything[best["sequence"], best["position"]])


def state_bytes(value, seen=None) -> int:
    """What an object holds: tensor bytes plus 8 per container entry or number, over everything reachable from its
    attributes (a list that gains an entry per batch, a tensor kept from a forward: both count)."""
    seen = set() if seen is None else seen
    if isinstance(value, (int, float, bool)):
        return 8  # before the identity check: small ints are shared objects
    if id(value) in seen or value is None or isinstance(value, (str, type)):
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(8 + state_bytes(k, seen) + state_bytes(v, seen) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(8 + state_bytes(v, seen) for v in value)
    if hasattr(value, "__dict__"):
        return sum(state_bytes(v, seen) for k, v in vars(value).items() if k not in ("sites", "_stack"))
    return 8


PROBES = {
    "residual": lambda sites: ResidualStats(sites, k=5),
    "residual_moments": lambda sites: ResidualStats(sites, k=5, moments=True),
    "down_proj": DownProjStats,
    "ma_means": lambda sites: ActivationMeans(sites, [MassiveActivation(1, (3, 7), (0, 2))]),
    "moments": SiteMoments,
    "attention": lambda sites: AttentionSinks(sites, [0], units=2),  # per-sequence sums, bounded by `units`
}


@pytest.mark.parametrize("probe", PROBES)
def test_probe_state_does_not_grow_with_sequences(probe, tiny_llama):
    generator = torch.Generator().manual_seed(0)
    with PROBES[probe](tiny_llama.sites) as stats:
        def forward():
            ids = torch.randint(0, 256, (2, 16), generator=generator)
            if hasattr(stats, "observe"):
                stats.observe(ids)
            tiny_llama.model(ids)
        forward()
        after_one = state_bytes(stats)
        for _ in range(5):
            forward()
        assert state_bytes(stats) == after_one > 0
    if probe == "down_proj":
        assert all(x is None for x in stats._last_input)  # no input tensor outlives its forward


def test_state_bytes_sees_a_growing_list():
    class Leaky:
        def __init__(self):
            self.kept = []
    leaky = Leaky()
    leaky.kept.append(torch.zeros(3))
    one = state_bytes(leaky)
    leaky.kept.append(torch.zeros(3))
    assert state_bytes(leaky) > one


def test_down_proj_stats_locate_a_planted_spike(tiny_llama):
    plant_super_weight(tiny_llama, layer=2, row=7, col=33)
    with DownProjStats(tiny_llama.sites) as down:
        tiny_llama.model(torch.tensor([tiny_llama.encode("a planted spike")]))
    layer2 = down.summary()[2]
    assert layer2["output_max"]["channel"] == 7
    assert layer2["input_at_output_peak"]["channel"] == 33
    assert layer2["input_max"]["channel"] == 33
