"""Massive-activation statistics: a planted MA is found where it was planted, streaming equals one pass, the exp
runs end to end, the report builds from its results, and the registry script edits only its YAML key."""
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import DATA_DIR, ROOT, compose_cfg

from outlierlab import runner
from outlierlab.probes.massive_activations import (
    ROLE_CODE,
    MACriterion,
    coordinate_reference,
    delimiter_mask,
    find_massive_activations,
    locations,
    mark_input_agnostic,
    position_roles,
)
from outlierlab.probes.stats import ResidualStats
from outlierlab.reports import ma as ma_report
from outlierlab.results import read_result

LAYER, CHANNEL, MARKER, UNIT = 2, 17, 5, 40
needs_data = pytest.mark.requires("data")


def plant_massive_activation(loaded, layer=LAYER, channel=CHANNEL, marker=MARKER, unit=UNIT, gain=4.0, weight=5.0):
    """Only the BOS embedding has `marker` set, and nothing else ever writes into that channel (o_proj and
    down_proj rows zeroed), so for every other token it stays exactly 0. MLP unit `unit` of `layer` reads the marker
    through gate and up (silu(g x) * g x, x ~ 8 after RMSNorm) and writes ~5000 into `channel`: a massive
    activation at position 0 that first appears after layers[layer], and only when BOS is prepended."""
    sites = loaded.sites
    with torch.no_grad():
        embed = sites.module("embed").weight
        embed[:, marker] = 0
        embed[loaded.tokenizer.bos_token_id, marker] = 1.0
        for index in range(sites.num_layers):
            sites.module(f"layers.{index}.attn").o_proj.weight[marker] = 0
            sites.down_proj(index).as_out_in()[marker] = 0
        mlp = sites.module(f"layers.{layer}").mlp
        for projection in (mlp.gate_proj, mlp.up_proj):
            projection.weight[unit] = 0
            projection.weight[unit, marker] = gain
        down = sites.down_proj(layer).as_out_in()
        down[:, unit] = 0
        down[channel, unit] = weight
    return loaded


def batches(loaded, bos: bool, count=3, size=2, length=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    text = ord("a") + torch.randint(0, 26, (count * size, length - 1), generator=generator)
    text[:, 5] = ord(".")  # a delimiter in every sequence
    first = torch.full((count * size, 1), loaded.tokenizer.bos_token_id if bos else ord("T"))
    return list(torch.cat([first, text], dim=1).split(size))


def collect(loaded, chunks, bos_policy):
    is_delimiter = delimiter_mask(loaded.tokenizer, [".", "\n"])
    stats = ResidualStats(loaded.sites, k=3, exceedance=MACriterion().exceedance(), moments=True)
    with torch.no_grad(), stats:
        for chunk in chunks:
            stats.observe(chunk, position_roles(chunk, is_delimiter, bos_policy))
            loaded.model(chunk)
    return stats


def test_position_roles_by_hand(tiny_llama):
    ids = torch.tensor([tiny_llama.encode("ab. c.\n")])
    is_delimiter = delimiter_mask(tiny_llama.tokenizer, [".", "\n"])
    roles = position_roles(ids, is_delimiter, "prepend")[0].tolist()
    names = ["bos", "first", "other", "first_delimiter", "other", "other", "delimiter", "delimiter"]
    assert roles == [ROLE_CODE[name] for name in names]
    no_bos = position_roles(ids[:, 1:], is_delimiter, "none")[0].tolist()
    assert no_bos == [ROLE_CODE[name] for name in names[1:]]


def test_planted_massive_activation_is_found_at_its_layer_channel_and_position(tiny_llama):
    loaded = plant_massive_activation(tiny_llama)
    criterion = MACriterion()
    stats = collect(loaded, batches(loaded, bos=True), "prepend")
    found = find_massive_activations(stats.summary(), stats.sequences, criterion, lambda t: str(t))
    assert found and min(entry["layer"] for entry in found) == LAYER
    first = [entry for entry in found if entry["layer"] == LAYER]
    assert [(e["channel"], e["role"], e["positions"], e["share"]) for e in first] == [(CHANNEL, "bos", [[0, 6]], 1.0)]
    assert first[0]["tokens"] == [[str(loaded.tokenizer.bos_token_id), 6]]
    assert first[0]["max_abs"] > 1000 and first[0]["mean_ratio_to_median"] > 1000
    references = {layer: coordinate_reference(*stats.coordinate_moments(layer)) for layer in {e["layer"] for e in found}}
    mark_input_agnostic(found, references, max_relative_std=0.1)
    # BOS at position 0 sees only itself: the same value in every sequence; ordinary coordinates vary.
    assert first[0]["input_agnostic"] and first[0]["relative_std"] < 1e-3
    assert references[LAYER]["median"]["relative_std"] > 0.1
    record, = [r for r in locations(found) if r["channel"] == CHANNEL]
    assert (record["role"], record["first_layer"], record["positions"]) == ("bos", LAYER, [[0, 6]])
    assert record["last_layer"] == loaded.sites.num_layers - 1  # the residual carries it to the end

    without_bos = collect(loaded, batches(loaded, bos=False), "none")
    assert find_massive_activations(without_bos.summary(), without_bos.sequences, criterion) == []


def test_streaming_statistics_equal_one_pass(tiny_llama):
    loaded = plant_massive_activation(tiny_llama)
    chunks = batches(loaded, bos=True, count=3, size=2)
    streamed = collect(loaded, chunks, "prepend")
    whole = collect(loaded, [torch.cat(chunks)], "prepend")
    assert streamed.sequences == whole.sequences == 6
    for a, b in zip(streamed.summary(), whole.summary()):
        assert torch.allclose(torch.tensor(a["mean_topk"]), torch.tensor(b["mean_topk"]), rtol=1e-5)
        assert a["mean_median"] == pytest.approx(b["mean_median"], rel=1e-5)
        assert [(h["channel"], h["label"], h["count"], h["sequences"], h["positions"], h["tokens"]) for h in a["hits"]] \
            == [(h["channel"], h["label"], h["count"], h["sequences"], h["positions"], h["tokens"]) for h in b["hits"]]
        for hit_a, hit_b in zip(a["hits"], b["hits"]):
            assert hit_a["mean"] == pytest.approx(hit_b["mean"], rel=1e-5)
    for layer in range(loaded.sites.num_layers):
        for x, y in zip(streamed.coordinate_moments(layer), whole.coordinate_moments(layer)):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-5)
    # and the moments are the plain mean/std over the sequences of one pass that keeps everything
    kept = {}
    with torch.no_grad(), loaded.sites.hook(f"layers.{LAYER}.out", lambda h: kept.__setitem__("h", h.double())):
        loaded.model(torch.cat(chunks))
    mean, std = streamed.coordinate_moments(LAYER)
    assert torch.allclose(mean, kept["h"].mean(dim=0), atol=1e-4)
    assert torch.allclose(std, kept["h"].std(dim=0, unbiased=False), atol=1e-3)


def _execute_planted(tmp_path, monkeypatch, bos: str):
    """The real exp config, shrunk, on tiny_llama with a planted MA (load_model wrapped to plant it)."""
    load = runner.load_model
    monkeypatch.setattr(runner, "load_model", lambda *args, **kwargs: plant_massive_activation(load(*args, **kwargs)))
    cfg = compose_cfg(["+exp=ma_stats", "model=tiny_llama", f"model.bos={bos}", "logger=none",
                       f"paths.data_dir={DATA_DIR}", f"paths.results_dir={tmp_path / 'results'}",
                       f"paths.cache_dir={tmp_path / 'cache'}", "exp.data.corpus.dataset=c4",
                       "exp.data.corpus.split=validation", "exp.data.corpus.windows=3", "exp.data.corpus.seqlen=32",
                       "exp.prompt.layers=[first_ma,peak,0]"])
    return runner.execute(cfg)


@needs_data
def test_exp_report_and_registry_end_to_end(tmp_path, monkeypatch):
    with_bos = _execute_planted(tmp_path, monkeypatch, "prepend")
    without_bos = _execute_planted(tmp_path, monkeypatch, "none")
    assert with_bos["first_massive_layer"] == LAYER and without_bos["first_massive_layer"] is None
    row, = with_bos["table"]["rows"]
    assert (row["channel"], row["role"], row["first_layer"], row["input_agnostic"]) == (CHANNEL, "bos", LAYER, True)
    assert without_bos["table"]["rows"] == []
    path = with_bos["trajectories"][f"{CHANNEL}@bos"]  # its value in every layer, from the streamed moments
    assert abs(path["mean"][LAYER - 1]) < 1 and abs(path["mean"][LAYER]) > 1000 and max(path["std"]) < 1e-2
    assert with_bos["weights_restored"] and with_bos["evaluations"]["exp.data.corpus"]["windows"] == 3
    assert {0, LAYER} <= set(with_bos["prompt"]["layers"])  # 0, first_ma and peak (sorted, no repeats)
    assert without_bos["prompt"]["layers"][0] == 0  # first_ma names no layer without an MA
    surface = with_bos["prompt"]["abs_activation"][LAYER]
    assert len(surface) == len(with_bos["prompt"]["ids"]) and max(surface[0]) == surface[0][CHANNEL] > 1000

    results = tmp_path / "results"
    record = read_result(results / "ma_stats" / "tiny_llama" / "bos_prepend.json")
    assert record["massive_activations"][0]["channel"] == CHANNEL
    tables = ma_report.build_tables(results, tmp_path / "tables")
    figures = ma_report.build_figures(results, tmp_path / "figures")
    assert {p.name for p in tables} >= {"ma_locations.md", "ma_layers_tiny_llama.md"}
    assert {"ma_layers_tiny_llama.png", "ma_bos_tiny_llama.png", f"ma_surface_tiny_llama_bos_prepend_layer{LAYER}.png"} \
        <= {p.name for p in figures}
    assert f"| tiny_llama | prepend | consistent | {CHANNEL} " in (tmp_path / "tables" / "ma_locations.md").read_text()
    assert ma_report.build_tables(tmp_path / "empty", tmp_path / "t2") == []
    assert ma_report.build_figures(tmp_path / "empty", tmp_path / "f2") == []

    target = tmp_path / "tiny_llama.yaml"
    original = (ROOT / "conf" / "model" / "tiny_llama.yaml").read_text()
    target.write_text(original)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "update_registry.py"),
                           str(results / "ma_stats" / "tiny_llama" / "bos_prepend.json"),
                           str(results / "ma_stats" / "tiny_llama" / "bos_none.json"), "--model-yaml", str(target)],
                          check=False, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    updated = target.read_text()
    entries = yaml.safe_load(updated)["massive_activations"]
    assert [(e["first_layer"], e["channels"], e["tokens"], e["bos"]) for e in entries] == [(LAYER, [CHANNEL], ["BOS"], "prepend")]
    assert entries[0]["provenance"].startswith("detected (outlierlab ma_stats")
    # only that key changed
    assert [line for line in updated.splitlines() if not line.startswith(("massive_activations", "  ", "    "))] == \
        [line for line in original.splitlines() if not line.startswith(("massive_activations", "  ", "    "))]


@pytest.mark.parametrize("override,message", [
    ("exp.criterion.min_abs=-1", "exp.criterion.min_abs=-1"),
    ("exp.prompt.layers=[middle]", "exp.prompt.layers: middle"),
    ("exp.data.corpus.dataset=redpajama", "unknown dataset 'redpajama'"),
    ("exp.data.corpus.sampling=shuffled", "exp.data.corpus.sampling=shuffled"),
])
def test_bad_exp_input_is_rejected_before_loading(override, message, tmp_path):
    # (run.py turns these errors into one line on stderr and exit code 2, see test_end_to_end.py)
    cfg = compose_cfg(["+exp=ma_stats", "model=tiny_llama", "logger=none", override, f"paths.data_dir={DATA_DIR}",
                       f"paths.results_dir={tmp_path}/results"])
    with pytest.raises(runner.USER_ERRORS, match=message.replace("[", r"\[")):
        runner.preflight(cfg)
