"""Models bigger than memory (models/offload.py): a tiny model dispatched by accelerate with most of its layers
offloaded to disk gives the same logits and weight hashes as in memory, under every intervention and after undo."""
from pathlib import Path

import hydra
import pytest
import torch
from conftest import compose_cfg, weights_hash
from test_interventions import DENSE_INTERVENTIONS, MA, SW, intervention_cfg

from outlierlab.evals.ppl import Windows
from outlierlab.interventions.base import EditSession
from outlierlab.models.load import byte_tokenizer, load_model
from outlierlab.probes.activation_means import measure_means

# 6 blocks of ~200 kB (float32) each: a 600 kB budget holds the embedding and block 0; blocks 1-5 are on disk
# (the SW and MA planted in block 1 by test_interventions' context among them).
TINY_SHAPE = ["model.tiny.num_hidden_layers=6", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=192"]
BUDGET = "model.max_memory={cpu: 600000}"


def write_tiny(directory, model="tiny_llama", shape=TINY_SHAPE):
    """A tiny random model written as a checkpoint (safetensors + tokenizer), as a real model is on disk."""
    loaded = load_model(compose_cfg([f"model={model}", *shape]).model, directory / "cache")
    loaded.model.save_pretrained(directory / "model")
    byte_tokenizer().save_pretrained(directory / "model")
    return directory / "model"


def path_cfg(source, *overrides):
    return compose_cfg(["model=path", f"model.source={source}", "model.bos=prepend", *overrides]).model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(in memory, offloaded) loads of the same checkpoint."""
    directory = tmp_path_factory.mktemp("offload")
    source = write_tiny(directory)
    in_memory = load_model(path_cfg(source), directory / "cache")
    offloaded = load_model(path_cfg(source, "model.device_map=auto", BUDGET), directory / "cache")
    return in_memory, offloaded


def test_most_layers_are_offloaded_and_nothing_changes(pair):
    in_memory, offloaded = pair
    on_disk = [name for name, where in offloaded.info["device_map"].items() if where == "disk"]
    assert "model.layers" in on_disk or sum(".layers." in name for name in on_disk) >= 4, offloaded.info["device_map"]
    assert offloaded.sites.down_proj(5).param.device.type == "meta"
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(in_memory.model(ids).logits, offloaded.model(ids).logits)
    assert weights_hash(in_memory.model) == weights_hash(offloaded.model)


def _edited(loaded, name, ids, context):
    with EditSession(loaded, context) as session:
        session.apply([hydra.utils.instantiate(intervention_cfg(name))])
        logits = loaded.model(ids).logits
        edited_hash = weights_hash(loaded.model)
        log = session.log
    return logits, edited_hash, log


@pytest.mark.parametrize("name", DENSE_INTERVENTIONS)  # experts: tests/test_moe.py
def test_every_intervention_acts_on_offloaded_weights(name, pair):
    """Under the edit: logits and weight hash equal the in-memory run's, bit for bit; after undo, the weights are
    the original ones in both."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for loaded in pair:
        before, logits_before = weights_hash(loaded.model), loaded.model(ids).logits
        context = {"super_weights": [SW], "massive_activations": [MA], "calibration_ids": ids,
                   "ma_means": measure_means(loaded, [MA], Windows(ids=ids, meta={}), batch_size=2)}
        results.append(_edited(loaded, name, ids, context))
        assert weights_hash(loaded.model) == before
        assert torch.equal(loaded.model(ids).logits, logits_before)
    (memory_logits, memory_hash, memory_log), (offload_logits, offload_hash, offload_log) = results
    assert torch.equal(memory_logits, offload_logits)
    assert memory_hash == offload_hash
    assert memory_log == offload_log


def test_an_edit_acts_and_the_store_is_untouched(pair):
    """The failure this module exists for: a write to the meta parameter changed nothing (design.md, "Scale")."""
    _, offloaded = pair
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    view = offloaded.sites.down_proj(5)
    stored = offloaded.sites.down_proj(5).as_out_in().clone()
    plain = offloaded.model(ids).logits
    with EditSession(offloaded) as session:
        session.set(view.param, view.index(2, 3), 50.0)
        assert not torch.equal(offloaded.model(ids).logits, plain)
        assert float(offloaded.sites.down_proj(5).as_out_in()[2, 3]) == 50.0
        assert float(session.original(view.param, view.index(2, 3))) == float(stored[2, 3])
    assert torch.equal(offloaded.sites.down_proj(5).as_out_in(), stored)


@pytest.mark.parametrize("override, message", [
    ("model.max_memory={cpu: 1000}", r"^model\.max_memory=\{'cpu': 1000\} holds 0\.0 MiB, less than one layer"),
    ("model.max_memory=2GiB", r"^model\.max_memory=2GiB is not a mapping"),
    ("model.max_memory={gpu: 2GiB}", r"^model\.max_memory: unknown device 'gpu'"),
    ("model.max_memory={cpu: lots}", r"^model\.max_memory\.cpu=lots is not a size"),
    ("model.device=tpu", r"^model\.device=tpu is not a device here"),
    ("model.device_map=everywhere", r"^model\.device_map=everywhere is not one of"),
    ("model.offload_folder=/dev/null/offload", r"^model\.offload_folder=/dev/null/offload cannot be written"),
])
def test_bad_dispatch_input_is_one_line_before_load(override, message, tmp_path, monkeypatch):
    """Exit 2 with one line, before any weights load (runner preflight)."""
    import outlierlab.models.load as load
    from conftest import DATA_DIR

    from outlierlab.errors import ConfigError
    from outlierlab.runner import preflight
    source = write_tiny(tmp_path)
    cfg = compose_cfg(["+exp=prune_sw", "model=path", f"model.source={source}", "model.device_map=auto",
                       override, "logger=none", f"paths.data_dir={DATA_DIR}",
                       f"paths.cache_dir={tmp_path / 'cache'}", f"paths.results_dir={tmp_path / 'results'}"])
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match=message):
        preflight(cfg)


def test_tiny_source_with_device_map_is_refused(tmp_path):
    from outlierlab.errors import ConfigError
    from outlierlab.models.load import check_dispatch
    from outlierlab.models.source import resolve_source
    cfg = compose_cfg(["model=tiny_llama", "model.device_map=auto"])
    with pytest.raises(ConfigError, match="needs weights on disk"):
        check_dispatch(cfg.model, resolve_source(cfg.model, tmp_path), tmp_path)


@pytest.mark.requires("smollm2")
def test_gguf_dequantization_says_what_it_needs(tmp_path):
    """The one-time GGUF dequantization is not bounded by a budget; its need is computed before it starts."""
    from outlierlab.models.load import gguf_float32_bytes
    from outlierlab.models.source import resolve_source
    cfg = compose_cfg(["model=smollm2_135m"])
    needed = gguf_float32_bytes(resolve_source(cfg.model, tmp_path).gguf_path)
    parameters = 134_515_008  # SmolLM2-135M (tied embedding counted once)
    assert needed == 4 * parameters


def test_whole_matrix_edits_are_kept_on_disk_and_removed(pair, monkeypatch):
    """A quantized matrix is a patch as large as the weight: it is spilled next to the offload folder, not held in
    memory, gives the in-memory run's logits, and its file goes with undo."""
    from outlierlab.models import offload
    monkeypatch.setattr(offload, "SPILL_BYTES", 0)
    in_memory, offloaded = pair
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    memory_logits, memory_hash, _ = _edited(in_memory, "quantize_weights", ids, {})
    spill_dir = Path(offloaded.info["offload_folder"]) / "edits"
    with EditSession(offloaded) as session:
        session.apply([hydra.utils.instantiate(intervention_cfg("quantize_weights"))])
        assert len(list(spill_dir.glob("*.pt"))) >= 5 * 7  # blocks 1-5 on disk, 7 linears each
        assert torch.equal(offloaded.model(ids).logits, memory_logits)
        assert weights_hash(offloaded.model) == memory_hash
    assert not list(spill_dir.glob("*.pt"))


@pytest.fixture(scope="module")
def all_on_disk(pair, tmp_path_factory):
    """The same checkpoint with everything on disk, the embedding too: the model's first parameter is on `meta`
    (as the embedding offloaded to the CPU is when a GPU computes)."""
    directory = tmp_path_factory.mktemp("all_on_disk")
    source = pair[0].info["source"]
    return load_model(path_cfg(source, "model.device_map=auto", "model.max_memory={cpu: 1}"), directory / "cache")


@pytest.fixture
def loglikelihoods(monkeypatch):
    """Every (log-likelihood, is-greedy) lm-eval's HFLM computes, one per request, in order."""
    from lm_eval.models.huggingface import HFLM
    scores, score = [], HFLM._loglikelihood_tokens

    def recorded(self, requests, *args, **kwargs):
        result = score(self, requests, *args, **kwargs)
        scores.extend(result)
        return result
    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", recorded)
    return scores


@pytest.fixture(scope="module")
def zeroshot_suite(tmp_path_factory):
    """Two lm-eval tasks on local data, 5 examples each, built once (building lm-eval's task index takes seconds)."""
    from conftest import DATA_DIR
    from omegaconf import OmegaConf

    from outlierlab.evals.zeroshot import build_tasks
    suite = OmegaConf.create({"tasks": ["arc_easy", "piqa"], "limit": 5, "batch_size": 4})
    return suite, build_tasks(suite.tasks, str(DATA_DIR), tmp_path_factory.mktemp("zeroshot"))


def _zeroshot(loaded, zeroshot_suite, scores, edit=None):
    """(accuracies, per-request log-likelihoods) of the lm-eval bridge, under `edit` if one is named."""
    from outlierlab.evals.zeroshot import evaluate_zeroshot
    scores.clear()
    with EditSession(loaded, {"super_weights": [SW]}) as session:
        session.apply([hydra.utils.instantiate(intervention_cfg(edit))] if edit else [])
        result = evaluate_zeroshot(loaded, *zeroshot_suite)
    return {name: task["acc"] for name, task in result["tasks"].items()}, list(scores)


@pytest.mark.requires("data")
def test_zeroshot_acts_on_offloaded_weights(pair, all_on_disk, zeroshot_suite, loglikelihoods):
    """The lm-eval bridge on offloaded models, plain and under edits of disk-offloaded blocks: every request's
    log-likelihood and the accuracies equal the in-memory run's, bit for bit, and each edit changes them."""
    in_memory, blocks_on_disk = pair
    assert all_on_disk.model.device.type == "meta" and all_on_disk.device.type == "cpu"
    plain = _zeroshot(in_memory, zeroshot_suite, loglikelihoods)
    assert len(plain[1]) == 5 * 4 + 5 * 2  # arc_easy: 4 choices, piqa: 2, for 5 examples each
    for edit in (None, "zero_sw", "quantize_weights"):  # the SW is in block 1, on disk; quantize: every block
        memory = plain if edit is None else _zeroshot(in_memory, zeroshot_suite, loglikelihoods, edit)
        assert edit is None or memory[1] != plain[1], f"{edit} changed no log-likelihood"
        for offloaded in (blocks_on_disk, all_on_disk):
            assert _zeroshot(offloaded, zeroshot_suite, loglikelihoods, edit) == memory, edit
