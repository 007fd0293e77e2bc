"""Streaming probes equal a single-pass computation and keep no activations."""
import torch
from conftest import plant_super_weight

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


def test_probe_state_does_not_grow_with_sequences(tiny_llama):
    def state_size(stats):
        return sum(len(t.entries) for t in stats.top) + stats.sum_topk.numel() + stats.sum_median.numel()
    with ResidualStats(tiny_llama.sites, k=5) as stats:
        tiny_llama.model(torch.randint(0, 256, (2, 16)))
        size_after_one = state_size(stats)
        for _ in range(5):
            tiny_llama.model(torch.randint(0, 256, (2, 16)))
    assert state_size(stats) == size_after_one
    with DownProjStats(tiny_llama.sites) as down:
        tiny_llama.model(torch.randint(0, 256, (2, 16)))
    assert all(x is None for x in down._last_input)  # no input tensor outlives its forward


def test_down_proj_stats_locate_a_planted_spike(tiny_llama):
    plant_super_weight(tiny_llama, layer=2, row=7, col=33)
    with DownProjStats(tiny_llama.sites) as down:
        tiny_llama.model(torch.tensor([tiny_llama.encode("a planted spike")]))
    layer2 = down.summary()[2]
    assert layer2["output_max"]["channel"] == 7
    assert layer2["input_at_output_peak"]["channel"] == 33
    assert layer2["input_max"]["channel"] == 33
