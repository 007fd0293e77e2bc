"""outlierlab: outliers in LLMs (super weights, massive activations, attention sinks), one study per config."""
from omegaconf import OmegaConf

from outlierlab.models.source import source_name, trained_bos

# conf/model/path.yaml names a model it has no YAML for after its source: name: ${source_name:${.source}}
OmegaConf.register_new_resolver("source_name", source_name, replace=True)
# conf/model/trained.yaml reads a checkpoint's BOS policy from its outlierlab.json: bos: ${trained_bos:${.source}}
OmegaConf.register_new_resolver("trained_bos", trained_bos, replace=True)
