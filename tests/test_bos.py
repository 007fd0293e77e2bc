"""`bos: auto`: BOS is added exactly when the model's tokenizer adds it by default (tokenizer(text), as HF and
lm-eval call it), per tokenizer kind; prepend / none stay explicit overrides; the resolved policy is recorded."""
import pytest
from conftest import SMALL_EVAL, compose_cfg
from omegaconf import open_dict
from tokenizers import processors

from outlierlab.models.load import byte_tokenizer, load_model, resolve_bos, tokenizer_adds_bos
from outlierlab.runner import execute


def adding_tokenizer():
    """A tokenizer whose post-processor puts BOS first (as Llama's and Gemma's do)."""
    tokenizer = byte_tokenizer()
    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)])
    return tokenizer


def no_bos_tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.bos_token = None
    return tokenizer


@pytest.mark.parametrize("make, adds, auto", [
    (adding_tokenizer, True, "prepend"),
    (byte_tokenizer, False, "none"),      # names a bos_token (<|bos|>) it never adds: a separator, not a BOS
    (no_bos_tokenizer, False, "none"),
])
def test_auto_follows_the_tokenizer(make, adds, auto):
    tokenizer = make()
    assert (tokenizer("abc")["input_ids"][0] == tokenizer.bos_token_id) is adds  # what HF / lm-eval would feed
    assert tokenizer_adds_bos(tokenizer) is adds
    assert resolve_bos("auto", tokenizer) == auto
    assert resolve_bos("none", tokenizer) == "none"  # explicit overrides are kept
    if tokenizer.bos_token_id is not None:
        assert resolve_bos("prepend", tokenizer) == "prepend"


def test_path_yaml_defaults_to_auto_and_the_loaded_model_records_it(tmp_path):
    assert compose_cfg(["model=path", "model.source=/x.gguf"]).model.bos == "auto"
    cfg = compose_cfg(["model=tiny_llama", "model.bos=auto"])
    loaded = load_model(cfg.model, tmp_path)
    # The tiny byte tokenizer names <|bos|> but does not add it: auto -> none; windows then carry no BOS.
    assert (loaded.bos, loaded.info["bos"], loaded.info["bos_config"]) == ("none", "none", "auto")
    assert loaded.encode("ab") == loaded.tokenizer("ab")["input_ids"]
    loaded.tokenizer = adding_tokenizer()
    from outlierlab.evals.data import Corpus
    from outlierlab.evals.ppl import build_windows
    protocol = cfg.eval.ppl.wikitext2.copy()
    protocol.update(seqlen=8, windows=1, bos="auto")
    windows = build_windows(protocol, Corpus("toy", "test", ["some text for one window"]), loaded)
    assert windows.meta["bos"] == "prepend" and int(windows.ids[0, 0]) == loaded.tokenizer.bos_token_id


def test_a_yaml_without_bos_is_auto_and_every_result_records_the_resolved_policy(tmp_path):
    cfg = compose_cfg(["+exp=sw_index", "model=tiny_llama", "logger=none", "exp.importance=false",
                       f"paths.results_dir={tmp_path}", *SMALL_EVAL])
    with open_dict(cfg):
        del cfg.model["bos"]
    record = execute(cfg)
    assert (record["model"]["bos"], record["model"]["bos_config"]) == ("none", "auto")
