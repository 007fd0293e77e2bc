"""Quantizers against hand-computed examples; SW-aware RTN, activation hooks and SmoothQuant on tiny models (exact
undo checked by hashing every weight); both quantization exps end to end on a tiny model; the report builders."""
import pytest
import torch
from conftest import (
    DATA_DIR,
    TINY_MODELS,
    compose_cfg,
    plant_super_weight,
    weights_hash,
)

from outlierlab.errors import ConfigError
from outlierlab.interventions.base import EditSession
from outlierlab.interventions.quant import (
    QuantizeActivations,
    QuantizeWeights,
    SmoothQuant,
)
from outlierlab.models.coords import SuperWeight
from outlierlab.models.load import load_model
from outlierlab.quant.rtn import (
    QuantSpec,
    fake_quantize,
    fake_quantize_activation,
    spec_from_label,
    zscore_clip_groups,
)
from outlierlab.quant.targets import linear_modules
from outlierlab.runner import execute, preflight

T = torch.tensor


def quantized(matrix, bits, block, zero_point="min", clip_zscore=None):
    return fake_quantize(T(matrix), spec_from_label(block, bits, zero_point), clip_zscore)[0]


def test_int3_per_tensor_by_hand():
    # min -1, max 6: delta = 7 / (2^3 - 1) = 1; codes round(w + 1); 2.5 -> 3.5 rounds half to even -> 4 -> 3.0
    out = quantized([[-1.0, 0.0, 0.3], [2.5, 6.0, 1.2]], 3, "tensor")
    assert torch.allclose(out, T([[-1.0, 0.0, 0.0], [3.0, 6.0, 1.0]]))


def test_int4_per_channel_by_hand():
    # row 0: min 0, max 3, delta 0.2: 1.52 -> 7.6 -> 8 -> 1.6; 0.66 -> 3.3 -> 3 -> 0.6
    # row 1: min -3, max 4.5, delta 0.5: 0.1 -> 6.2 -> 6 -> 0.0; 1.3 -> 8.6 -> 9 -> 1.5
    out = quantized([[0.0, 1.52, 3.0, 0.66], [-3.0, 0.1, 4.5, 1.3]], 4, "channel")
    assert torch.allclose(out, T([[0.0, 1.6, 3.0, 0.6], [-3.0, 0.0, 4.5, 1.5]]), atol=1e-6)


def test_int3_two_dimensional_blocks_by_hand():
    # 2x2 tiles of a 2x4 matrix, each with its own range. Left: min 0, max 7, delta 1. Right: min 10, max 24,
    # delta 2: 17.1 -> 3.55 -> 4 -> 18; 11.2 -> 0.6 -> 1 -> 12.
    matrix = [[0.0, 7.0, 10.0, 24.0], [3.2, 1.0, 17.1, 11.2]]
    assert torch.allclose(quantized(matrix, 3, "2x2"), T([[0.0, 7.0, 10.0, 24.0], [3.0, 1.0, 18.0, 12.0]]))
    assert not torch.allclose(quantized(matrix, 3, "2x2"), quantized(matrix, 3, "tensor"))
    # Tiles are rows x cols of the (out, in) matrix: 1x4 tiles are the rows, 2x1 tiles the columns.
    assert torch.equal(quantized(matrix, 3, "1x4"), quantized(matrix, 3, "channel"))
    columns = quantized(matrix, 3, "2x1")
    for col in range(4):
        assert torch.equal(columns[:, col], quantized([[v] for v in T(matrix)[:, col].tolist()], 3, "tensor")[:, 0])


def test_edge_blocks_are_smaller_tiles():
    matrix = torch.randn(5, 7)
    out = fake_quantize(matrix, spec_from_label("2x3", 4))[0]
    for r in range(0, 5, 2):
        for c in range(0, 7, 3):
            tile = matrix[r:r + 2, c:c + 3]
            assert torch.equal(out[r:r + 2, c:c + 3], fake_quantize(tile, QuantSpec(4, "tensor"))[0])


def test_int4_flat_groups_by_hand():
    # flat4 on a 2x3 matrix: groups (row-major) [0, 1.52, 3, 0.66] and the remainder [-3, 4.5] (exact).
    # Group 1: min 0, max 3, delta 0.2: 1.52 -> 7.6 -> 8 -> 1.6; 0.66 -> 3.3 -> 3 -> 0.6.
    out = quantized([[0.0, 1.52, 3.0], [0.66, -3.0, 4.5]], 4, "flat4")
    assert torch.allclose(out, T([[0.0, 1.6, 3.0], [0.6, -3.0, 4.5]]), atol=1e-6)


def test_zero_point_forms_by_hand():
    # 2 bits, min -0.9, max 2.1, delta 1. "min": codes round(w + 0.9) -> [-0.9, 0.1, 2.1].
    # "integer": z = round(0.9) = 1, codes round(w) + 1 -> [0, 1, 3] -> (code - 1) * 1 = [-1, 0, 2]: 0 is exact.
    matrix = [[-0.9, 0.0, 2.1]]
    assert torch.allclose(quantized(matrix, 2, "tensor", "min"), T([[-0.9, 0.1, 2.1]]), atol=1e-6)
    assert torch.allclose(quantized(matrix, 2, "tensor", "integer"), T([[-1.0, 0.0, 2.0]]), atol=1e-6)


def test_symmetric_rtn_by_hand():
    # 3 bits symmetric: levels +-3, delta = max|w| / 3 = 1; 0.5 and 1.5 round half to even (0 and 2)
    assert torch.equal(quantized([[-1.0, 0.4, 0.5, 1.5, 3.0]], 3, "tensor", "symmetric"),
                       T([[-1.0, 0.0, 0.0, 2.0, 3.0]]))
    # 2 bits per channel: levels +-1; row 0 delta 4 (-4 -> -4, 1 -> 0.25 -> 0), row 1 delta 1 (0.5 -> 0, -1 -> -1)
    assert torch.equal(quantized([[-4.0, 1.0], [0.5, -1.0]], 2, "channel", "symmetric"), T([[-4.0, 0.0], [0.0, -1.0]]))
    assert torch.equal(quantized([[0.0, 0.0]], 4, "tensor", "symmetric"), T([[0.0, 0.0]]))


def test_constant_group_is_unchanged():
    assert torch.equal(quantized([[0.5, 0.5], [0.5, 0.5]], 3, "tensor"), T([[0.5, 0.5], [0.5, 0.5]]))


def test_zscore_clipping_clips_what_it_should():
    # |w|: nine 1s and one 10: mean 1.9, std (n-1) = sqrt(8.1) = 2.846; z = 2 -> threshold 7.592
    groups = T([[1.0, -1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -10.0]])
    clipped, count = zscore_clip_groups(groups, 2.0)
    threshold = 1.9 + 2.0 * 8.1 ** 0.5
    assert count == 1
    assert clipped[0, -1].item() == pytest.approx(-threshold, rel=1e-6)
    assert torch.equal(clipped[0, :-1], groups[0, :-1])
    assert zscore_clip_groups(groups, 3.0)[1] == 0  # threshold 10.44: nothing to clip


@pytest.mark.parametrize("label", ["12xy", "flat0", "0x4", "rows"])
def test_bad_block_labels(label):
    with pytest.raises(ValueError, match="block"):
        spec_from_label(label, 4)


def test_activation_quantization_by_hand():
    # 2 bits over the whole tensor. Naive: min -2, max 100, delta 34: everything but 100 lands on -2.
    # Hold-out 1: 100 -> median 0.5 (lower median), range [-2, 3], delta 5/3; 100 is put back afterwards.
    x = T([[[1.0, -2.0, 100.0], [0.5, 0.0, 3.0]]])
    assert torch.allclose(fake_quantize_activation(x, 2), T([[[-2.0, -2.0, 100.0], [-2.0, -2.0, -2.0]]]))
    expected = T([[[-2 + 2 * 5 / 3, -2.0, 100.0], [-2 + 2 * 5 / 3, -2 + 5 / 3, 3.0]]])
    assert torch.allclose(fake_quantize_activation(x, 2, holdout=1), expected, atol=1e-6)
    # Per token: token 0 as the naive case; token 1: min 0, max 3, delta 1, 0.5 rounds half to even -> 0.
    per_token = fake_quantize_activation(x, 2, granularity="token")
    assert torch.allclose(per_token, T([[[-2.0, -2.0, 100.0], [0.0, 0.0, 3.0]]]))


SW = (1, 5, 17)


@pytest.fixture
def planted(tiny_llama):
    plant_super_weight(tiny_llama, *SW)
    return tiny_llama


def sw_value(loaded):
    view = loaded.sites.down_proj(SW[0])
    return view.param.data[view.index(SW[1], SW[2])].item()


def test_sw_aware_rtn_keeps_the_super_weight_exact_and_undoes_bit_exactly(planted):
    before, original = weights_hash(planted.model), sw_value(planted)
    context = {"super_weights": [SW]}
    with EditSession(planted, context) as session:
        session.apply([QuantizeWeights(bits=3, block="16x16")])
        # Plain RTN: the SW is its tile's max (kept as the range's end), and every other weight of the tile falls
        # on one level: the range is spent on the SW.
        plain = planted.sites.down_proj(1).as_out_in().clone()
        others = torch.cat([plain[0:16, 16:32].reshape(-1)[:5 * 16 + 1], plain[0:16, 16:32].reshape(-1)[5 * 16 + 2:]])
        assert sw_value(planted) == original and others.unique().numel() == 1
    with EditSession(planted, context) as session:
        session.apply([QuantizeWeights(bits=3, block="16x16", clip_zscore=3.0)])
        assert sw_value(planted) < original  # clipped and not restored
    assert weights_hash(planted.model) == before
    with EditSession(planted, context) as session:
        session.apply([QuantizeWeights(bits=3, block="16x16", clip_zscore=3.0, restore_super_weights=True)])
        assert sw_value(planted) == original
        edit = session.log[-1]
        assert edit["restored_super_weights"] == [{"super_weight": "(1, 5, 17)", "value": original}]
        assert edit["summary"]["clipped"] >= 1
        # Its 16x16 tile (rows 0-15, cols 16-31) is RESTORE(Q(CLIP_z(tile))): clipped, quantized, SW put back.
        aware = planted.sites.down_proj(1).as_out_in()
        float_tile = session.original(planted.sites.down_proj(1).param, (Ellipsis,))[0:16, 16:32]
        expected, info = fake_quantize(float_tile, QuantSpec(3, "tensor"), clip_zscore=3.0)
        expected[5, 1] = original
        assert info["clipped"] >= 1 and torch.equal(aware[0:16, 16:32], expected)
        assert len(edit["tensors"]) == 4 * 7  # every linear of every block, no embedding / LM head
    assert weights_hash(planted.model) == before


def test_weight_quantization_is_rtn_of_every_block_linear(tiny_llama):
    with EditSession(tiny_llama, {}) as session:
        originals = {name: module.weight.detach().clone() for name, module in linear_modules(tiny_llama.sites)}
        session.apply([QuantizeWeights(bits=4, block="channel", match=r"mlp\.")])
        for name, module in linear_modules(tiny_llama.sites):
            if ".mlp." in name:
                assert torch.equal(module.weight, fake_quantize(originals[name], QuantSpec(4, "channel"))[0])
            else:
                assert torch.equal(module.weight, originals[name])
        assert all(".mlp." in t["name"] for t in session.log[-1]["tensors"])


def test_activation_hook_feeds_the_quantized_input(tiny_llama):
    seen = {}
    ids = torch.tensor([tiny_llama.encode("Quantize me, and hold out the largest value.")])
    with tiny_llama.sites.hook("layers.1.mlp.down_proj.in", lambda x: seen.__setitem__("float", x.clone())):
        tiny_llama.model(ids)
    before = weights_hash(tiny_llama.model)
    with EditSession(tiny_llama, {}) as session:
        session.apply([QuantizeActivations(bits=4, holdout=1, match=r"layers\.1\.mlp\.down_proj")])
        with tiny_llama.sites.hook("layers.1.mlp.down_proj.in", lambda x: seen.__setitem__("fed", x.clone())):
            tiny_llama.model(ids)
        record = session.log[-1]["inputs"]["layers.1.mlp.down_proj.weight"]
    assert torch.equal(seen["fed"], fake_quantize_activation(seen["float"], 4, holdout=1))
    assert record["calls"] == 1 and record["sum_sq_error"] > 0
    assert weights_hash(tiny_llama.model) == before


@pytest.mark.parametrize("overrides", [[f"model={name}"] for name in TINY_MODELS]
                         + [["model=tiny_gemma", "model.tiny.model_type=gemma2"]], ids=lambda o: " ".join(o))
def test_smoothquant_leaves_the_float_model_unchanged(overrides, tmp_path):
    loaded = load_model(compose_cfg(overrides).model, tmp_path)
    ids = torch.tensor([loaded.encode("SmoothQuant moves the difficulty from activations to weights.")])
    with torch.no_grad():
        logits = loaded.model(ids).logits
    before = weights_hash(loaded.model)
    calibration = torch.randint(0, 256, (2, 24))
    with EditSession(loaded, {"calibration_ids": calibration}) as session:
        session.apply([SmoothQuant(alpha=0.5)])
        assert weights_hash(loaded.model) != before
        with torch.no_grad():
            smoothed = loaded.model(ids).logits
        norms = session.log[-1]["norms"]
        assert norms and all(n["scale_min"] > 0 for n in norms.values())
    assert torch.allclose(smoothed, logits, rtol=1e-4, atol=1e-4)
    assert weights_hash(loaded.model) == before
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, logits)  # the norm hooks are gone too


def test_smoothquant_needs_calibration_data(tiny_llama):
    with pytest.raises(ValueError, match="calibration"):
        EditSession(tiny_llama, {}).apply([SmoothQuant()])


@pytest.mark.parametrize("kwargs", [{"bits": 1}, {"block": "3x"}, {"clip_zscore": -1.0}, {"zero_point": "mid"},
                                    {"match": "("}])
def test_bad_weight_quantizer_arguments(kwargs):
    with pytest.raises(ValueError):
        QuantizeWeights(**kwargs)


TINY_EVAL = ["model=tiny_llama", "logger=none", "eval.ppl.wikitext2.seqlen=32", "eval.ppl.wikitext2.windows=1",
             "eval.ppl.c4.seqlen=32", "eval.ppl.c4.windows=1"]


@pytest.mark.parametrize("override,message", [
    ("exp.blocks=[12xy]", "exp.bits/exp.blocks: block '12xy'"),
    ("exp.bits=[1]", "bits=1"),
    ("exp.methods.sw_aware.clip_zscore=-2", "exp.methods.sw_aware: clip_zscore=-2"),
])
def test_bad_sweep_is_caught_before_loading(override, message, tmp_path):
    cfg = compose_cfg(["+exp=sw_quant_weights", *TINY_EVAL, override, f"paths.results_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        preflight(cfg)


def test_bad_activation_config_is_caught_before_loading(tmp_path):
    cfg = compose_cfg(["+exp=sw_quant_activations", *TINY_EVAL, "exp.interventions.a8.granularity=channel"])
    with pytest.raises(ConfigError, match="exp.interventions.a8: granularity=channel"):
        preflight(cfg)


@pytest.mark.requires("data")
def test_quant_exps_end_to_end_and_reports(tmp_path):
    from outlierlab.reports import run_builders
    common = [*TINY_EVAL, f"paths.results_dir={tmp_path}/results", f"paths.data_dir={DATA_DIR}",
              f"paths.cache_dir={tmp_path}/cache"]
    weights = execute(compose_cfg(["+exp=sw_quant_weights", *common, "exp.bits=[4]", "exp.blocks=[16x16,tensor]",
                                   "model.super_weights=[{coord:'(1, 5, 17)'}]"]))
    assert weights["weights_restored"] is True
    assert [(r["bits"], r["block"], r["method"]) for r in weights["runs"]] == [
        (4, "16x16", "rtn"), (4, "16x16", "sw_aware"), (4, "tensor", "rtn"), (4, "tensor", "sw_aware")]
    aware = next(r for r in weights["runs"] if r["method"] == "sw_aware")
    assert aware["restored_super_weights"][0]["super_weight"] == "(1, 5, 17)"
    assert [row["block"] for row in weights["table"]["rows"]] == ["-", "16x16", "tensor"]
    activations = execute(compose_cfg(["+exp=sw_quant_activations", *common, "exp.calibration.seqlen=32",
                                       "exp.calibration.windows=1"]))
    assert activations["weights_restored"] is True
    rows = {row["variant"]: row for row in activations["table"]["rows"]}
    assert rows["original"]["act_rel_error"] is None and rows["w8a8_naive"]["act_rel_error"] > 0
    assert activations["variants"]["w8a8_smoothquant"]["edits"][0]["edit"] == "smoothquant"

    tables = run_builders("tables", tmp_path / "results", tmp_path / "tables", only=["sw_quant"])
    figures = run_builders("figures", tmp_path / "results", tmp_path / "figures", only=["sw_quant"])
    assert {p.suffix for p in tables} == {".md", ".tex"} and {p.suffix for p in figures} == {".png", ".pdf"}
    assert all(p.stat().st_size > 0 for p in tables + figures)
    assert run_builders("tables", tmp_path / "empty", tmp_path / "none", only=["sw_quant"]) == []
    # every compared number carries its interval: PPL over windows, SW-aware / RTN paired over the same windows
    weights_table = next(p for p in tables if p.name == "sw_quant_weights_tiny_llama.md").read_text()
    assert "sw_aware / rtn wikitext2" in weights_table
    tensor_row = next(line for line in weights_table.splitlines() if line.startswith("| INT4  | tensor"))
    assert tensor_row.count("[") == 5  # rtn and sw_aware on both protocols, and their paired ratio


@pytest.mark.smollm2
@pytest.mark.requires("smollm2")
def test_smollm2_weights_are_on_an_int4_grid_and_sw_aware_rtn_keeps_its_super_weight():
    """SmolLM2's GGUF weights are Q4_1: 4-bit asymmetric codes in runs of 32 input channels. So INT4 RTN with 1x32
    blocks gives them back exactly; at 128x128 the SW-aware quantizer keeps the super weight to the bit."""
    cfg = compose_cfg(["model=smollm2_135m"])
    loaded = load_model(cfg.model, cfg.paths.cache_dir)
    before = weights_hash(loaded.model)
    weights = [SuperWeight.parse(entry.coord) for entry in cfg.model.super_weights]
    view = loaded.sites.down_proj(weights[0].layer)
    value = view.param.data[view.index(weights[0].row, weights[0].col)].item()
    with EditSession(loaded, {"super_weights": weights}) as session:
        session.apply([QuantizeWeights(bits=4, block="1x32", match=r"layers\.(0|11)\.")])
        assert session.log[-1]["summary"]["max_abs_error"] == 0.0
        assert session.log[-1]["summary"]["tensors"] == 14
    with EditSession(loaded, {"super_weights": weights}) as session:
        session.apply([QuantizeWeights(bits=4, block="128x128", clip_zscore=9.0, restore_super_weights=True,
                                       match=r"layers\.11\.mlp")])
        assert view.param.data[view.index(weights[0].row, weights[0].col)].item() == value
        assert session.log[-1]["summary"]["clipped"] > 0
    assert weights_hash(loaded.model) == before
