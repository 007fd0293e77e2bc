"""Layer-major observe passes (probes/layer_major.py) see exactly what the per-window forward sees, on every tiny
decoder family, in memory and offloaded."""
import pytest
import torch
from conftest import TINY_MODELS, compose_cfg
from test_offload import BUDGET, TINY_SHAPE, path_cfg, write_tiny

from outlierlab.models.load import load_model
from outlierlab.probes.layer_major import observe_windows
from outlierlab.probes.stats import ResidualStats


def observed(loaded, order: str, ids: torch.Tensor) -> tuple[dict, dict, str]:
    """Every block point's tensor per (site, batch) and a ResidualStats summary, from a pass in `order`."""
    loaded.info["pass_order_config"] = order
    seen, current = {}, {}

    def keep(site):
        def hook(tensor):
            seen[(site, current["batch"])] = tensor.detach().clone()
        return hook

    points = [point for layer in range(loaded.sites.num_layers) for point in loaded.sites.block_points(layer)]
    with loaded.sites.hooks([(point, keep(point)) for point in points]), ResidualStats(loaded.sites, k=3) as stats:
        def before(batch):
            current["batch"] = int(batch[0, 0]) * 1000 + int(batch[0, 1])
            stats.observe(batch)
        used = observe_windows(loaded, ids, batch_size=2, desc="test", before=before)
    return seen, stats.summary(), used


def assert_same(window, layer):
    (seen_w, summary_w, _), (seen_l, summary_l, _) = window, layer
    assert seen_w.keys() == seen_l.keys()
    for key in seen_w:
        assert torch.equal(seen_w[key], seen_l[key]), key
    assert repr(summary_w) == repr(summary_l)


@pytest.mark.parametrize("model", TINY_MODELS)
def test_layer_major_equals_the_forward(model, tmp_path):
    loaded = load_model(compose_cfg([f"model={model}"]).model, tmp_path)
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    window, layer = observed(loaded, "window", ids), observed(loaded, "layer", ids)
    assert (window[2], layer[2]) == ("window", "layer")
    assert loaded.info["passes"]["test"] == "layer-major"
    assert_same(window, layer)


def test_offloaded_model_runs_layer_major_by_default(tmp_path):
    source = write_tiny(tmp_path)
    in_memory = load_model(path_cfg(source), tmp_path / "cache")
    offloaded = load_model(path_cfg(source, "model.device_map=auto", BUDGET), tmp_path / "cache")
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    window, layer = observed(in_memory, "auto", ids), observed(offloaded, "auto", ids)
    assert (window[2], layer[2]) == ("window", "layer")
    assert_same(window, layer)
    assert offloaded.sites.down_proj(3).param.device.type == "meta"  # dropped again after its pass
