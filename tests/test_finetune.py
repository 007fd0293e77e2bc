"""+exp=finetune on the tiny model: every method trains exactly what it claims, the protected weights stay
bit-identical, a resumed run continues the same loss curve, bad input stops before loading, checkpoints load."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import DATA_DIR, compose_cfg, plant_super_weight

from outlierlab.finetune.atlas import measure, norm_modules
from outlierlab.finetune.loop import finetune
from outlierlab.finetune.methods import METHODS, lora_budget, merge_into, select
from outlierlab.finetune.tasks import PretrainingBatches, boolq_split
from outlierlab.models.coords import SuperWeight
from outlierlab.models.load import load_model

PLANTED = SuperWeight(1, 7, 11)


def _cfg(method: str, *extra: str):
    return compose_cfg(["+exp=finetune", "model=tiny_llama", f"finetune/method={method}", "finetune.steps=4",
                        "finetune.checkpoint_every=2", "exp.atlas.windows=2", *extra])


def _setup(cfg, tmp_path):
    """The tiny model with a planted super weight (and so a massive activation) and one outlier norm gain."""
    loaded = load_model(cfg.model, tmp_path)
    plant_super_weight(loaded, PLANTED.layer, PLANTED.row, PLANTED.col)
    with torch.no_grad():
        loaded.sites.module("layers.2.norm1").weight[5] = 8.0  # a gamma outlier channel
        generator = torch.Generator().manual_seed(0)
        for module in norm_modules(loaded.sites).values():  # uniform jitter is never > 3 sigma: only the planted one is
            module.weight.add_(0.02 * torch.rand(module.weight.shape, generator=generator) - 0.01)
    stream = torch.randint(0, len(loaded.tokenizer), (4096,), generator=torch.Generator().manual_seed(1))
    batches = PretrainingBatches(stream, cfg.finetune.batch_size, 32, int(cfg.exp.seed), None)
    atlas = measure(loaded, cfg.exp.atlas, batches.windows(2), [], [], "detect")
    return loaded, batches, atlas


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def test_atlas_finds_the_planted_outliers(tmp_path):
    _loaded, _batches, atlas = _setup(_cfg("full"), tmp_path)
    assert PLANTED in atlas.super_weights
    assert atlas.ma["massive"] and PLANTED.row in atlas.ma_channels
    assert atlas.gamma_outliers == {"model.layers.2.input_layernorm": [5]}
    assert PLANTED.layer in atlas.ma_layers


@pytest.mark.parametrize("method", [m for m in METHODS if m != "lora"])
def test_method_trains_exactly_what_it_claims(method, tmp_path):
    cfg = _cfg(method, "finetune.weight_decay=0.1")  # decay must not move untrained elements either
    loaded, batches, atlas = _setup(cfg, tmp_path)
    selection = select(cfg.finetune.method, loaded, atlas, cfg.finetune.lora, 0, cfg.finetune.steps)
    claimed = selection.claimed()
    before = _snapshot(loaded.model)
    finetune(selection, batches, cfg.finetune, tmp_path / "ck", resume=False)
    merge_into(selection, loaded)
    after = _snapshot(loaded.model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == set(claimed)
    for name in claimed:  # no element outside the claimed mask moved
        keep = selection.keep.get(name)
        if keep is not None:
            assert torch.equal(before[name][keep], after[name][keep]), name
            assert int((~keep).sum()) == claimed[name]
        else:
            assert claimed[name] == before[name].numel()
    total = sum(p.numel() for p in loaded.model.parameters())
    expected = {
        "full": total,
        "norm_only": sum(m.weight.numel() for m in norm_modules(loaded.sites).values()),
        "outlier_protected": total - sum(int(m.sum()) for m in selection.keep.values()),
    }
    if method in expected:
        assert sum(claimed.values()) == expected[method]
    if method == "norm_only":
        assert all("norm" in name for name in claimed)
    if method in ("lisa", "owl_lisa", "owlore"):
        layers = {layer for period in selection.schedule for layer in period}
        assert all(len(period) == 2 for period in selection.schedule)
        assert {int(n.split(".")[2]) for n in claimed if n.startswith("model.layers.")} == layers
        assert "model.embed_tokens.weight" in claimed
    if method == "outlier_guided":
        assert sum(claimed.values()) <= lora_budget(loaded.sites, cfg.finetune.lora.r)
        down = f"model.layers.{PLANTED.layer}.mlp.down_proj.weight"
        trained = ~selection.keep[down] if down in selection.keep else torch.ones_like(before[down], dtype=torch.bool)
        assert trained[PLANTED.row].all() and trained[:, PLANTED.col].all()  # MA row and SW column
        assert "model.layers.2.input_layernorm.weight" in claimed
    if method == "outlier_protected":
        assert f"model.layers.{PLANTED.layer}.mlp.down_proj.weight" in selection.keep
    if method == "owlore":  # GaLore projects exactly the block linears' weights
        names = set(selection.galore["names"])  # every block's (LISA holds them all), of which the sampled train
        assert names == {n for n in selection.params if n.startswith("model.layers.") and n.endswith("proj.weight")}
        assert names & set(claimed) == {n for n in claimed if n.startswith("model.layers.") and n.endswith("proj.weight")}


def test_owlore_moves_each_block_matrix_in_a_rank_r_subspace(tmp_path):
    """4 steps in one LISA period and one GaLore projection, no weight decay: every trained block matrix moved by
    an update of rank <= r; the embeddings (plain AdamW) by one of higher rank."""
    cfg = _cfg("owlore", "finetune.method.lr=0.01")
    loaded, batches, atlas = _setup(cfg, tmp_path)
    selection = select(cfg.finetune.method, loaded, atlas, cfg.finetune.lora, 0, cfg.finetune.steps)
    before = _snapshot(loaded.model)
    finetune(selection, batches, cfg.finetune, tmp_path / "ck", resume=False)
    after = _snapshot(loaded.model)
    rank = cfg.finetune.method.galore.rank

    def rank_of(name):
        return int(torch.linalg.matrix_rank((after[name] - before[name]).double(), rtol=1e-4))
    projected = [n for n in selection.galore["names"] if not torch.equal(before[n], after[n])]
    assert len(projected) == 2 * 7  # 2 sampled blocks x q, k, v, o, gate, up, down
    for name in projected:
        assert 0 < rank_of(name) <= rank < min(before[name].shape), name
    assert rank_of("model.embed_tokens.weight") > rank

def test_lora_trains_its_adapters_and_merges_into_the_block_linears(tmp_path):
    cfg = _cfg("lora")
    loaded, batches, atlas = _setup(cfg, tmp_path)
    before = _snapshot(loaded.model)
    budget = lora_budget(loaded.sites, cfg.finetune.lora.r)  # r x (in + out) of every block linear
    selection = select(cfg.finetune.method, loaded, atlas, cfg.finetune.lora, 0, cfg.finetune.steps)
    claimed = selection.claimed()
    assert claimed and all(".lora_A." in n or ".lora_B." in n for n in claimed)
    assert sum(claimed.values()) == budget
    finetune(selection, batches, cfg.finetune, tmp_path / "ck", resume=False)
    merge_into(selection, loaded)
    after = _snapshot(loaded.model)
    assert set(after) == set(before)  # unwrapped again
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {n for n in before if n.startswith("model.layers.") and n.endswith("proj.weight")}


def test_lora_initialisation_follows_the_seed(tmp_path):
    """peft draws lora_A at random: the same seed gives the same adapters whatever ran before, another seed others."""
    cfg = _cfg("lora")
    drawn = []
    for seed in (0, 0, 1):
        loaded = load_model(cfg.model, tmp_path)
        torch.rand(seed + 7)  # whatever used the global RNG before
        selection = select(cfg.finetune.method, loaded, None, cfg.finetune.lora, seed, cfg.finetune.steps)
        drawn.append({n: p.detach().clone() for n, p in selection.params.items() if "lora_A" in n})
    assert drawn[0] and all(torch.equal(drawn[0][n], drawn[1][n]) for n in drawn[0])
    assert not all(torch.equal(drawn[0][n], drawn[2][n]) for n in drawn[0])


@pytest.mark.parametrize("base", ["full", "lora"])
def test_outlier_protected_leaves_protected_weights_bit_identical(base, tmp_path):
    cfg = _cfg("outlier_protected", f"finetune.method.base={base}", "finetune.weight_decay=0.1",
               "finetune.method.lr=0.01")
    loaded, batches, atlas = _setup(cfg, tmp_path)
    view = loaded.sites.down_proj(PLANTED.layer)
    index = view.index(PLANTED.row, PLANTED.col)
    sw_before = view.param.data[index].clone()
    gamma = loaded.sites.module("layers.2.norm1").weight
    gamma_before = gamma.detach().clone()
    down_before = view.param.detach().clone()
    selection = select(cfg.finetune.method, loaded, atlas, cfg.finetune.lora, 0, cfg.finetune.steps)
    finetune(selection, batches, cfg.finetune, tmp_path / "ck", resume=False)
    merge_into(selection, loaded)
    assert torch.equal(view.param.data[index], sw_before)  # bit-identical
    channels = sorted({5, *atlas.ma_channels})
    assert torch.equal(gamma.detach()[channels], gamma_before[channels])
    assert not torch.equal(view.param.detach(), down_before)  # ... while the rest of that matrix trained


@pytest.mark.parametrize("method", ["lisa", "owlore"])
def test_a_resumed_run_continues_the_same_loss_curve(method, tmp_path):
    cfg = _cfg(method, "finetune.steps=6", "finetune.method.period=2", "finetune.checkpoint_every=3",
               *(["finetune.method.galore.update_gap=2"] if method == "owlore" else []))
    curves, weights = [], []
    for stop in (None, 3):
        loaded, batches, atlas = _setup(cfg, tmp_path)
        selection = select(cfg.finetune.method, loaded, atlas, cfg.finetune.lora, 0, cfg.finetune.steps)
        checkpoint = tmp_path / f"ck_{stop}"
        first = finetune(selection, batches, cfg.finetune, checkpoint, stop_at=stop)
        if stop is not None:
            assert first["steps"] == 3
            loaded, batches, atlas = _setup(cfg, tmp_path)  # a fresh process: the original weights again
            selection = select(cfg.finetune.method, loaded, atlas, cfg.finetune.lora, 0, cfg.finetune.steps)
            second = finetune(selection, batches, cfg.finetune, checkpoint)
            assert second["resumed_from"] == 3
            first = second
        curves.append([entry["loss"] for entry in first["history"]])
        weights.append(_snapshot(loaded.model))
    assert len(curves[0]) == 6
    assert curves[1] == pytest.approx(curves[0], rel=1e-6)
    assert all(torch.allclose(weights[0][n], weights[1][n]) for n in weights[0])


def test_bad_method_or_task_stops_before_loading():
    from outlierlab.runner import ConfigError, preflight
    with pytest.raises(ConfigError, match="finetune.method.kind=bogus"):
        preflight(_cfg("full", "finetune.method.kind=bogus"))
    with pytest.raises(ConfigError, match="finetune.steps=0"):
        preflight(_cfg("full", "finetune.steps=0"))
    with pytest.raises(ConfigError, match="finetune.method.base=none"):
        preflight(_cfg("outlier_protected", "finetune.method.base=none"))


@pytest.mark.requires("data")
def test_boolq_split_keeps_every_passage_on_one_side():
    path = DATA_DIR / "boolq" / "val.superglue_format.jsonl"
    train, test, meta = boolq_split(path, 0.3, 0)
    assert meta["train_rows"] == len(train) and meta["test_rows"] == len(test)
    title = lambda row: row["passage"].split(" -- ", 1)[0]
    assert not {title(r) for r in train} & {title(r) for r in test}
    assert len(train) + len(test) == 3270 and 0.25 < len(test) / 3270 < 0.35
    again = boolq_split(path, 0.3, 0)
    assert [r["idx"] for r in again[1]] == [r["idx"] for r in test]
    assert [r["idx"] for r in boolq_split(path, 0.3, 1)[1]] != [r["idx"] for r in test]


@pytest.mark.requires("data")
def test_finetune_run_writes_a_result_and_a_loadable_checkpoint(tmp_path):
    from outlierlab.runner import execute
    cfg_overrides = ["+exp=finetune", "model=tiny_llama", "finetune/method=lora", "finetune.steps=2",
                     "exp.atlas.windows=1", "logger=none", "eval.ppl.wikitext2.seqlen=64",
                     "eval.ppl.wikitext2.windows=2", f"paths.results_dir={tmp_path / 'results'}",
                     f"paths.checkpoints_dir={tmp_path / 'ck'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_cfg(cfg_overrides)
    record = execute(cfg)
    row = record["table"]["rows"][0]
    assert row["method"] == "lora" and row["trainable"] == record["finetune"]["trainable"]["total"] > 0
    assert record["survival"]["sw_total"] == 0  # the random model has no super weight
    assert record["run_tag"] == "cpt_lora_s0" and record["finetune"]["seed"] == 0
    directory = tmp_path / "ck" / "finetune" / "tiny_llama" / "cpt" / "lora" / "s0"
    assert json.loads((directory / "outlierlab.json").read_text())["bos"] == "prepend"
    assert (directory / "adapter" / "adapter_config.json").is_file()
    other = compose_cfg(["model=trained", f"model.source={directory}"])
    assert other.model.bos == "prepend"
    reloaded = load_model(other.model, tmp_path / "cache")
    assert reloaded.info["kind"] == "local"
    from outlierlab.models.hashing import weights_sha256
    final = torch.load(directory / "checkpoint" / "trainable.pt", weights_only=True)
    assert final and all("lora_" in name for name in final)
    assert weights_sha256(reloaded.model) != weights_sha256(load_model(cfg.model, tmp_path).model)
    seed1 = execute(compose_cfg([*cfg_overrides, "seed=1"]))  # another seed: its own batches, the same "before"
    assert seed1["run_tag"] == "cpt_lora_s1" and seed1["finetune"]["seed"] == 1
    assert seed1["before"]["cached"] and seed1["before"]["ppl"] == record["before"]["ppl"]
    assert [h["loss"] for h in seed1["history"]] != [h["loss"] for h in record["history"]]
    from outlierlab.reports import run_builders
    tables = run_builders("tables", tmp_path / "results", tmp_path / "tables", ["finetune"])
    assert [p.name for p in tables] == ["finetune_tiny_llama_cpt.md", "finetune_tiny_llama_cpt.tex"]
    assert "| lora   | 2 " in tables[0].read_text()  # one row, n = 2 seeds
    figures = run_builders("figures", tmp_path / "results", tmp_path / "figures", ["finetune"])
    assert {p.suffix for p in figures} == {".png", ".pdf"}


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_galore_update_lies_in_the_rank_r_subspace_of_its_projection(shape):
    """GaLore (arXiv 2403.03507): the smaller side of each 2-D gradient projected on its top-r singular vectors;
    every update within one update_gap lies in that r-dimensional subspace; the next refresh takes a new one; Adam's
    moments have the projected shape; a group without rank is plain AdamW (1-D and 2-D)."""
    from outlierlab.finetune.galore import GaLoreAdamW
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape, generator=generator))
    plain = torch.nn.Parameter(torch.randn(shape, generator=generator))
    reference = torch.nn.Parameter(plain.detach().clone())
    rank, gap = 3, 4
    optimizer = GaLoreAdamW([{"params": [weight], "rank": rank, "update_gap": gap}, {"params": [plain]}], lr=0.1)
    adamw = torch.optim.AdamW([reference], lr=0.1, weight_decay=0.0)
    start = weight.detach().clone()
    for step in range(gap):
        grad = torch.randn(shape, generator=generator)
        weight.grad, plain.grad, reference.grad = grad.clone(), grad.clone(), grad.clone()
        optimizer.step()
        adamw.step()
    state = optimizer.state[weight]
    basis, left = state["basis"], state["left"]
    assert left == (shape[0] <= shape[1])
    assert state["exp_avg"].shape == ((rank, shape[1]) if left else (shape[0], rank))
    delta = (weight.detach() - start).double()
    inside = basis.double() @ basis.double().t() @ delta if left else delta @ basis.double().t() @ basis.double()
    assert torch.allclose(inside, delta, atol=1e-5) and int(torch.linalg.matrix_rank(delta, rtol=1e-6)) == rank
    assert torch.allclose(plain, reference, atol=1e-6)  # the unprojected group is AdamW
    weight.grad = torch.randn(shape, generator=generator)
    optimizer.step()  # step 4 = update_gap: a fresh basis from this gradient
    assert not torch.allclose(optimizer.state[weight]["basis"].abs(), basis.abs(), atol=1e-3)
