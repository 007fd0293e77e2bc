"""The benchmark compares like with like: every way (ours, nnsight, host copy, hidden_states) gives our numbers on
a tiny model; the probes' state does not grow with the number of sequences; the fast reductions equal torch's."""
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_cfg
from test_massive_activations import plant_massive_activation

from outlierlab.models.load import load_model
from outlierlab.probes.massive_activations import MACriterion
from outlierlab.probes.moments import SiteMoments
from outlierlab.probes.stats import (
    DownProjStats,
    ResidualStats,
    peak_abs,
    row_medians,
    row_topk,
)

sys.path.insert(0, str(ROOT / "scripts"))
import bench
import bench_ways


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gpt2", "tiny_qwen2"])
def test_every_way_gives_our_numbers(model, tmp_path):
    loaded = load_model(compose_cfg([f"model={model}"]).model, tmp_path)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 24), generator=generator) for _ in range(2)]
    results = {}
    with torch.no_grad():
        for name in bench_ways.WAYS:
            way = bench_ways.make(name, loaded, k=3)
            for batch in batches:
                way.forward(batch)
            way.close()
            results[name] = way.statistics()
    ours = results["ours"]
    assert len(ours["residual"]) == loaded.sites.num_layers and ours["down_proj"]
    for name in ("nnsight", "host_copy", "hidden_states"):
        for layer, (theirs, mine) in enumerate(zip(results[name]["residual"], ours["residual"])):
            assert theirs["max"] == mine["max"], (name, layer)
            assert theirs["mean_topk"] == pytest.approx(mine["mean_topk"], rel=1e-12), (name, layer)
            assert theirs["mean_median"] == pytest.approx(mine["mean_median"], rel=1e-12), (name, layer)
    for name in ("nnsight", "host_copy"):
        assert results[name]["down_proj"] == ours["down_proj"], name
    assert results["hidden_states"]["down_proj"] is None  # hidden_states has no down_proj


def test_a_wrong_statistic_is_caught(tiny_llama):
    """The comparison can fail: a way that reads the wrong site (the block's input) disagrees with ours."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = bench_ways.make("ours", tiny_llama, 3)
        ours.forward(ids)
        ours.close()
        shifted = bench_ways.make("hidden_states", tiny_llama, 3)
        hidden = tiny_llama.model(ids, output_hidden_states=True).hidden_states
        shifted.results.add(2, [bench_ways.residual_statistics(h, 3) for h in hidden[:-1]], None)
    assert shifted.statistics()["residual"] != ours.statistics()["residual"]


def all_probes(loaded):
    return [ResidualStats(loaded.sites, k=3, exceedance=MACriterion().exceedance(), moments=True),
            DownProjStats(loaded.sites), SiteMoments(loaded.sites, "layers.{i}.attn.out")]


def state_after(loaded, sequences: int) -> list[dict]:
    """Every probe's state (tensor bytes, container entries) after `sequences` sequences, BOS first so the planted
    massive activation is hit in every one."""
    generator = torch.Generator().manual_seed(0)
    probes = all_probes(loaded)
    with torch.no_grad():
        for probe in probes:
            probe.__enter__()
        for _ in range(sequences // 2):
            ids = torch.randint(0, 256, (2, 24), generator=generator)
            ids[:, 0] = loaded.tokenizer.bos_token_id
            probes[0].observe(ids)
            loaded.model(ids)
        for probe in probes:
            probe.__exit__(None, None, None)
    assert probes[0].sequences == sequences
    assert any(row["hits"] for row in probes[0].summary())  # the exceedance scan has state to grow
    return [bench_ways.state_size(probe) for probe in probes]


def test_probe_state_does_not_grow_with_the_number_of_sequences(tiny_llama):
    loaded = plant_massive_activation(tiny_llama)
    few, many = state_after(loaded, 2), state_after(loaded, 20)
    assert all(part["tensor_bytes"] > 0 for part in few)
    assert few == many


def test_state_size_sees_what_accumulates(tiny_llama):
    """The measure itself can fail: a probe that appends every batch to a list shows as growth."""
    with torch.no_grad(), ResidualStats(tiny_llama.sites, k=3) as stats:
        stats.kept = []
        for count in range(3):
            tiny_llama.model(torch.randint(0, 256, (1, 8)))
            stats.kept.append(torch.zeros(4))
            if count == 0:
                first = bench_ways.state_size(stats)
    last = bench_ways.state_size(stats)
    assert last["tensor_bytes"] == first["tensor_bytes"] + 2 * 16 and last["entries"] == first["entries"] + 2


def test_fast_reductions_equal_torch():
    generator = torch.Generator().manual_seed(0)
    for shape in [(1, 1, 5), (2, 7, 9), (3, 64, 48), (2, 2, 1)]:
        x = torch.randn(shape, generator=generator)
        x[0, -1, 0] = -x.abs().max() * 2  # the peak is negative
        magnitude = x.abs()
        flat = magnitude.reshape(shape[0], -1)
        for k in range(1, min(4, flat.shape[1]) + 1):
            values, index = row_topk(magnitude, k)
            expected = flat.topk(k, dim=1)
            assert torch.equal(values, expected.values)
            assert torch.equal(flat.gather(1, index), expected.values)
        assert torch.equal(row_medians(flat), flat.median(dim=1).values)
        value, row, channel = peak_abs(x)
        index = magnitude.reshape(-1).argmax()
        assert int(row) * shape[2] + int(channel) == int(index) and value == x.reshape(-1)[index]
    ties = torch.zeros(2, 3, 4)
    ties[1, 2, 3] = ties[1, 0, 1] = -1.0
    assert [int(part) for part in peak_abs(ties)[1:]] == [3, 1]  # the first in row-major order, as argmax
    with_nan = torch.rand(3, 10, generator=generator)
    with_nan[1, 4] = float("nan")
    assert torch.equal(row_medians(with_nan).isnan(), torch.tensor([False, True, False]))
    assert torch.equal(row_medians(with_nan)[[0, 2]], with_nan.median(dim=1).values[[0, 2]])
    even = torch.tensor(np.arange(10, dtype=np.float32)[None, ::-1].copy())
    assert float(row_medians(even)[0]) == 4.0  # the lower median, as torch.median


def test_bench_runs_and_writes_its_table(tmp_path):
    record = bench.main(["--model", "tiny_llama", "--seqlen", "16", "--repeats", "2", "--memory-sequences", "2,4",
                         "--memory-seqlen", "8", "--out", str(tmp_path)])
    assert set(record["cases"]) == set(bench.CASES)
    assert record["cases"]["plain"]["ratio_to_plain"] == 1.0
    assert all(len(row["times_ms"]) == 2 for row in record["cases"].values())
    assert record["machine"]["torch_threads"] >= 1 and len(record["load_average"]["before"]) == 3
    assert [row["sequences"] for row in record["memory"]] == [2, 4]
    first, second = record["memory"]
    assert first["probe_state"] == second["probe_state"]
    table = (tmp_path / "cpu.md").read_text()
    assert "| ours_all |" in table and "| nnsight |" in table and (tmp_path / "cpu.json").is_file()
    # which code and which environment: the commit, the dirty flag (with the diff), the lock
    assert len(record["git"]["commit"]) == 40 and isinstance(record["git"]["dirty"], bool)
    assert "lock" in record["environment"] and "the lock." in table
