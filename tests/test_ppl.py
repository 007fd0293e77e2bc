"""The perplexity evaluator equals a direct computation, cuts windows as the protocols say, and records inf/NaN."""
import math

import torch
import torch.nn.functional as F
from conftest import compose_cfg
from omegaconf import OmegaConf

from outlierlab.evals.data import Corpus
from outlierlab.evals.ppl import build_windows, perplexity

TEXT = ["The first document talks about cats.", "", "A second one talks about dogs and birds at length.",
        "Third: numbers 1 2 3 4 5 6 7 8 9 10."]


def protocol(**overrides):
    base = compose_cfg([]).eval.ppl.wikitext2
    return OmegaConf.merge(base, {"windows": None, "seqlen": 16, **overrides})


def test_windows_are_the_joined_text_cut_in_order(tiny_llama):
    corpus = Corpus("toy", "test", TEXT)
    windows = build_windows(protocol(bos="none"), corpus, tiny_llama)
    ids = tiny_llama.tokenizer("\n\n".join(TEXT), add_special_tokens=False)["input_ids"]
    assert windows.ids.shape == (len(ids) // 16, 16)
    assert windows.ids.reshape(-1).tolist() == ids[: windows.ids.numel()]
    with_bos = build_windows(protocol(bos="prepend"), corpus, tiny_llama)
    assert (with_bos.ids[:, 0] == tiny_llama.tokenizer.bos_token_id).all()
    assert with_bos.ids[0, 1:].tolist() == ids[:15]


def test_ppl_equals_direct_computation(tiny_llama):
    windows = build_windows(protocol(bos="prepend"), Corpus("toy", "test", TEXT), tiny_llama)
    result = perplexity(tiny_llama.model, windows, batch_size=2)
    with torch.no_grad():
        logits = tiny_llama.model(windows.ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows.ids[:, 1:].reshape(-1))
    assert math.isclose(result["ppl"], math.exp(nll.item()), rel_tol=1e-5)
    assert result["tokens_scored"] == windows.ids.shape[0] * 15
    hf_losses = [tiny_llama.model(w[None], labels=w[None]).loss.item() for w in windows.ids]
    assert math.isclose(result["nll"], sum(hf_losses) / len(hf_losses), rel_tol=1e-5)


def test_random_windows_are_seeded_and_inside_documents(tiny_llama):
    docs = ["x" * 10, "abcdefghijklmnopqrstuvwxyz" * 3, "short"]
    proto = protocol(sampling="random", windows=4, seed=3, bos="none")
    first = build_windows(proto, Corpus("toy", "validation", docs), tiny_llama)
    again = build_windows(proto, Corpus("toy", "validation", docs), tiny_llama)
    assert torch.equal(first.ids, again.ids)
    text = tiny_llama.tokenizer.decode(first.ids[0])
    assert text in docs[1]


def test_inf_and_nan_are_results(tiny_llama):
    windows = build_windows(protocol(bos="none"), Corpus("toy", "test", TEXT), tiny_llama)
    lm_head = tiny_llama.model.lm_head.weight
    saved = lm_head.data.clone()
    try:
        lm_head.data.fill_(float("nan"))
        assert math.isnan(perplexity(tiny_llama.model, windows)["ppl"])
        lm_head.data.copy_(saved)
        lm_head.data[:, :] = 0
        lm_head.data[0] = 1e6  # every token but 0 gets ~ -1e6 log-probability -> exp overflows
        assert perplexity(tiny_llama.model, windows)["ppl"] == math.inf
    finally:
        lm_head.data.copy_(saved)
