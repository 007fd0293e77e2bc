"""+exp=finetune over seeds: the seed is in the run tag and the record, sets the batches (a repeated seed the same
ones), leaves the atlas windows (and so the cached "before") alone; the report aggregates seeds (mean ± std, n, the
paired PPL ratio to full) and says which methods the seeds separate."""
from __future__ import annotations

import math

import torch
from conftest import compose_cfg

from outlierlab.finetune.tasks import PretrainingBatches
from outlierlab.reports import finetune as report
from outlierlab.results import write_result
from outlierlab.tables import Column, Table, markdown


def test_the_run_tag_and_checkpoint_directory_name_the_seed():
    cfg = compose_cfg(["+exp=finetune", "model=tiny_llama", "finetune/method=full", "seed=2"])
    assert cfg.run_tag == "cpt_full_s2" and cfg.exp.seed == 2
    assert cfg.exp.output_dir.endswith("/finetune/tiny_llama/cpt/full/s2")
    assert compose_cfg(["+exp=finetune", "model=tiny_llama", "finetune/method=lora"]).run_tag == "cpt_lora_s0"


def test_the_seed_sets_the_batches_but_not_the_atlas_windows():
    cfg = compose_cfg(["+exp=finetune", "model=tiny_llama"])
    stream = torch.randint(0, 1000, (4096,), generator=torch.Generator().manual_seed(1))
    same, again, other = (PretrainingBatches(stream, cfg.finetune.batch_size, 32, seed, None) for seed in (0, 0, 1))
    for step in range(3):
        assert torch.equal(same(step)[0], again(step)[0])
        assert not torch.equal(same(step)[0], other(step)[0])
    assert torch.equal(same.windows(4), other.windows(4))  # so "before" (keyed by the windows) is shared


def _record(method: str, seed: int, ppl_shift: float, tag_seed: bool = True) -> dict:
    """A synthetic fine-tuning record: 4 windows whose NLLs move with the method and (a little) with the seed."""
    nll = [3.0 + ppl_shift + 0.01 * seed + 0.02 * w for w in range(4)]
    row = {"method": method, "trainable": 10, "trainable_at_once": 10, "ppl_before": 30.0, "w8a8_before": 40.0,
           "ppl": math.exp(sum(nll) / 4), "w8a8": 50.0 + seed, "sw_kept": "1/1", "ma_kept": "yes",
           "ma_after": 100.0 + seed, "gamma_outliers_kept": "2/2", "channel_outliers_kept": "1/1", "train_s": 1.0}
    table = Table([Column(key, key) for key in row], [row], index="method")
    return {"run_tag": f"cpt_{method}" + (f"_s{seed}" if tag_seed else ""), "model": {"name": "tiny", "kind": "hf"},
            "eval": "finetune_quick", "wall_time_s": 2.0, "config": {"seed": seed, "exp": {"w8a8": ["w8", "a8"]}},
            "finetune": {"method": {"name": method, "lr": 1e-3}, "task": {"name": "cpt", "seqlen": 32}, "seed": seed,
                         "settings": {"steps": 4, "batch_size": 2, "warmup_steps": 1}, "trainable": {"total": 10}},
            "history": [{"step": 1, "loss": 4.0 + seed}, {"step": 2, "loss": 3.0 + ppl_shift + seed}],
            "after": {"ppl": {"wikitext2": {"ppl": row["ppl"], "window_nll": nll}}},
            "survival": {"super_weights": {}, "ma_before": 100.0, "ma_after": 100.0 + seed},
            "table": table.to_dict()}


def _write(root, records):
    for record in records:
        write_result(record, root / "finetune" / "tiny" / f"{record['run_tag']}.json")


def test_the_report_shows_mean_std_n_and_the_paired_ratio_over_seeds(tmp_path):
    _write(tmp_path, [_record(m, s, shift) for m, shift in (("full", 0.0), ("lora", 0.1)) for s in (0, 1, 2)])
    written = report.tables(tmp_path, tmp_path / "tables")
    text = written[0].read_text()
    assert "| 51.000 ± 1.000 |" in text  # W8A8 50, 51, 52 over seeds: mean 51, sample std 1
    rows = {row["method"]: row for row in report.table(report._groups(tmp_path)["tiny_cpt"]).rows}
    assert rows["full"]["n"] == rows["lora"]["n"] == 3 and "| 3 " in text
    assert math.isclose(rows["lora"]["ppl_ratio"], math.exp(0.1))  # the same windows, every NLL + 0.1
    assert all(math.isclose(v, math.exp(0.1)) for v in rows["lora"]["ppl_ratio_ci"]) and "ppl_ratio" not in rows["full"]
    assert math.isclose(rows["lora"]["loss_final_sd"], 1.0)
    single = report.table({"full": report._groups(tmp_path)["tiny_cpt"]["full"][:1]})
    assert single.rows[0]["n"] == 1 and single.rows[0]["ppl_sd"] is None  # no std from one seed
    assert "±" not in markdown(single) and "±" in text
    assert {p.suffix for p in report.figures(tmp_path, tmp_path / "figures")} == {".png", ".pdf"}


def test_separated_needs_disjoint_ranges_and_every_seed_s_interval_to_exclude_one():
    full = [_record("full", s, 0.0) for s in (0, 1, 2)]
    assert report.separated([_record("lora", s, 0.1) for s in (0, 1, 2)], full)  # + 0.1 nats, std 0.01: apart
    assert not report.separated([_record("lora", s, 0.005) for s in (0, 1, 2)], full)  # ranges overlap
    assert not report.separated([_record("lora", 0, 0.1)], full[:1])  # one seed: no std, never separated
    seeds_apart = [_record("lora", s, 0.1) for s in (0, 1, 2)]
    for record in seeds_apart:  # noisy windows: means apart, but each seed's paired interval straddles 1
        nll = record["after"]["ppl"]["wikitext2"]["window_nll"]
        record["after"]["ppl"]["wikitext2"]["window_nll"] = [v + d for v, d in zip(nll, (-1.0, 1.2, -1.0, 1.2))]
    assert not report.separated(seeds_apart, full)


def test_records_without_a_seed_in_the_tag_or_any_seed_do_not_break_the_report(tmp_path, capsys):
    old = _record("full", 0, 0.0, tag_seed=False)  # an old record: seed only in its config
    del old["finetune"]["seed"]
    seedless = _record("lora", 0, 0.1, tag_seed=False)
    del seedless["finetune"]["seed"], seedless["config"]["seed"]
    _write(tmp_path, [old, _record("full", 0, 0.0), seedless])
    groups = report._groups(tmp_path)["tiny_cpt"]
    assert list(groups) == ["full"] and groups["full"][0]["run_tag"] == "cpt_full_s0"
    err = capsys.readouterr().err
    assert "records no seed" in err and "keeping cpt_full_s0" in err
    assert report.tables(tmp_path, tmp_path / "tables")


def test_the_caption_states_the_quantization_protocol_that_ran():
    quantization = {"w8": {"weights": "per_channel", "bits": 8}, "a8": {"activations": "per_token", "bits": 8,
                                                                       "range": "dynamic"}}
    assert report.quantization_protocol(quantization) == (
        "INT8 weights per channel + INT8 activations per token (dynamic range)")
    assert report.quantization_protocol({}) == "none"
