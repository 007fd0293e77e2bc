"""Architecture families as data: where each family keeps its modules and what its conventions are.

This file is the one source of architecture facts (module paths, norm gain convention, parallel blocks, flattened
MLPs, SmoothQuant groups). Adding a family is one `Family` entry in FAMILIES; `models/sites.py` resolves site names
through it and nothing else in the code looks at model names. An entry is chosen by the config's model_type and,
where a type has several block layouts, by config attributes (`Family.when`), never by a model's name.
"""
from __future__ import annotations

from dataclasses import dataclass

from outlierlab.errors import UnsupportedArchitecture

@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers: str  # attribute path from the CausalLM to the list of decoder blocks
    attn: str
    norm1: str | None  # None: the family has no such pre-norm (OLMo-2 normalizes sublayer outputs instead)
    norm2: str | None
    down_proj: str
    embed: str
    final_norm: str | None  # None: the family has no norm before the LM head (OPT post-LN)
    # GPT-2's Conv1D stores weights as [in, out] (its MLP's c_fc and c_proj); every other family uses [out, in].
    down_proj_transposed: bool = False
    # The other linears of a block (None: the family has none; a model of the family without it, e.g. Phi-3's fused
    # gate_up_proj, is told so when the site is resolved).
    gate_proj: str | None = None
    # The MLP's input projection whose output channels are down_proj's input channels (up_proj in gated MLPs,
    # the first linear elsewhere): where a super weight's input spike is made.
    up_proj: str | None = None
    o_proj: str | None = None
    # Norms inside attention over the head dimension (QK-norm: Qwen3, Gemma-3, OLMo-2); a model of the family
    # without them (Llama) simply has none.
    q_norm: str | None = None
    k_norm: str | None = None
    # Norms of the sublayer outputs (sandwich norms): applied to the attention / MLP output before the residual add.
    norm_attn_out: str | None = None
    norm_mlp_out: str | None = None
    # Post-LN norms of the residual sum, applied after the add: LN(x + attn(x)), LN(h + mlp(h)) (BERT). Not input
    # norms (nothing else normalises a sublayer's input) and not sandwich norms (those act before the add).
    norm_after_attn: str | None = None
    norm_after_mlp: str | None = None
    # An encoder (BERT): loaded with AutoModel, no LM head; `layers`/`embed` are paths from that base model.
    encoder: bool = False
    # How a norm's stored weight w becomes its gain: gain = norm_gain_offset + w (1.0 for Gemma's RMSNorm, which
    # multiplies by 1 + w; 0.0 for a plain gamma). Every norm of a family follows its convention.
    norm_gain_offset: float = 0.0
    # Config attributes that pick this entry among those of the same model type: {attribute: allowed values}
    # (Falcon's three block layouts, OPT's pre-/post-LN). Read from the model's config, never from its name. The
    # first entry (in table order) whose conditions hold is the model's, as in a routing table.
    when: tuple[tuple[str, tuple], ...] = ()
    # Attention and MLP both read the block input (Falcon's parallel blocks): there is no residual after attention.
    parallel_blocks: bool = False
    # OPT flattens the MLP path (norm2, fc1, fc2) to [batch * positions, channels]; hooks there still receive
    # [batch, positions, channels], like every other family's.
    flat_mlp: bool = False
    # SmoothQuant's norm -> linears table (arXiv 2211.10438, as its smooth.py does for Llama and OPT): the linears
    # inside a block that read each norm's output. A fused projection (Phi-3's qkv_proj / gate_up_proj) is listed
    # beside the split ones; the ones a model has are used. None: no table (smoothing refuses the family).
    smooth_groups: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    # Mixture-of-experts blocks. In transformers 5 the experts of a block are one module of fused 3-D parameters
    # (gate_up_proj [E, 2I, d], down_proj [E, d, I]; gpt-oss stores them transposed, with biases): `experts` is its
    # path inside a block, `router` the router's, `shared_expert` a dense MLP every token also goes through (Qwen2-MoE,
    # DeepSeek-V3). A block of an MoE family may be dense (DeepSeek-V3's first_k_dense_replace layers, Qwen3-MoE's
    # mlp_only_layers): it has the linear `down_proj` instead; Sites tells the two apart per block. How the fused
    # tensors are laid out is read from the experts module itself (transformers' use_experts_implementation flags).
    experts: str | None = None
    router: str | None = None
    shared_expert: str | None = None
    # The norms are LayerNorms (subtract the channel mean, add a bias): a rotation of the residual stream does not
    # commute with them (interventions/rotation.py refuses these families; RMSNorm families are rotated).
    layer_norm: bool = False

    def matches(self, config) -> bool:
        """The config's type is one of this entry's and every `when` condition holds (an absent attribute reads
        as None)."""
        return config.model_type in self.model_types and all(
            getattr(config, attribute, None) in allowed for attribute, allowed in self.when)

    def required_roles(self) -> list[str]:
        """Block roles every block of a model of this family must have: the ones the table names, except the
        optional other linears (gate/up/o_proj), which are checked when addressed."""
        return [role for role in ROLES if role not in OPTIONAL_ROLES and self.path(role) is not None
                and not (self.experts and role in MOE_OR_DENSE_ROLES)]

    @property
    def moe(self) -> bool:
        return self.experts is not None

    @property
    def moe_block(self) -> str | None:
        """The path of a block's sparse MLP (the experts' parent: `mlp`)."""
        return self.experts.rpartition(".")[0] if self.experts else None

    def path(self, role: str) -> str | None:
        """The module path inside a block for a role (`norm1`, `mlp.down_proj`, ...)."""
        return getattr(self, _ROLE_FIELDS[role])


# Block roles: the sites `layers.{i}.<role>` -> the Family field holding their module path.
_ROLE_FIELDS = {"attn": "attn", "norm1": "norm1", "norm2": "norm2", "norm_attn_out": "norm_attn_out",
                "norm_mlp_out": "norm_mlp_out", "norm_after_attn": "norm_after_attn",
                "norm_after_mlp": "norm_after_mlp", "mlp.down_proj": "down_proj", "mlp.gate_proj": "gate_proj",
                "mlp.up_proj": "up_proj", "attn.o_proj": "o_proj", "attn.q_norm": "q_norm", "attn.k_norm": "k_norm"}
ROLES = tuple(_ROLE_FIELDS)
# Linears a model of a family may lack (Phi-3's fused gate_up_proj): checked when a site addresses them.
OPTIONAL_ROLES = ("mlp.gate_proj", "mlp.up_proj", "attn.o_proj", "attn.q_norm", "attn.k_norm")
# Roles a block of an MoE family has only when it is dense (checked per block by Sites).
MOE_OR_DENSE_ROLES = ("mlp.down_proj",)


_LLAMA_PATHS = dict(layers="model.layers", attn="self_attn", norm1="input_layernorm", norm2="post_attention_layernorm",
                    down_proj="mlp.down_proj", embed="model.embed_tokens", final_norm="model.norm",
                    gate_proj="mlp.gate_proj", up_proj="mlp.up_proj", o_proj="self_attn.o_proj",
                    q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
_LLAMA_SMOOTH = (("norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.qkv_proj")),
                 ("norm2", ("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj")))
_OPT_PATHS = dict(layers="model.decoder.layers", attn="self_attn", down_proj="fc2", embed="model.decoder.embed_tokens",
                  up_proj="fc1", o_proj="self_attn.out_proj", flat_mlp=True, layer_norm=True)
# Llama-like attention and norms around a sparse MLP (`mlp.experts`, `mlp.gate`); dense blocks of these families keep
# Llama's mlp.gate_proj / up_proj / down_proj. SmoothQuant: Llama's table; in a sparse block the MLP norm's readers are
# the router, every expert's gate_up_proj and the shared expert (Sites.moe_input_weights).
_MOE_PATHS = dict(_LLAMA_PATHS, experts="mlp.experts", router="mlp.gate", smooth_groups=_LLAMA_SMOOTH)
_NEOX_PATHS = dict(layers="gpt_neox.layers", attn="attention", norm1="input_layernorm", norm2="post_attention_layernorm",
                   down_proj="mlp.dense_4h_to_h", up_proj="mlp.dense_h_to_4h", o_proj="attention.dense",
                   embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
                   smooth_groups=(("norm1", ("attention.query_key_value",)), ("norm2", ("mlp.dense_h_to_4h",))),
                   layer_norm=True)
_FALCON_NORM_PER_SUBLAYER_SMOOTH = (("norm1", ("self_attention.query_key_value",)), ("norm2", ("mlp.dense_h_to_4h",)))
_FALCON_PATHS = dict(layers="transformer.h", attn="self_attention", down_proj="mlp.dense_4h_to_h",
                     embed="transformer.word_embeddings", final_norm="transformer.ln_f", up_proj="mlp.dense_h_to_4h",
                     o_proj="self_attention.dense", layer_norm=True)

FAMILIES: tuple[Family, ...] = (
    Family(
        # Phi-3's fused gate_up_proj has no split gate/up sites (told when addressed).
        name="llama-like",
        model_types=("llama", "mistral", "qwen2", "qwen3", "olmo", "phi3", "smollm3", "granite", "outlierlab_llama"),
        **_LLAMA_PATHS, smooth_groups=_LLAMA_SMOOTH,
    ),
    # Gemma (1) has Llama's module paths, but its RMSNorm multiplies by 1 + w (a stored w = 0 is a gain of 1).
    Family(name="gemma", model_types=("gemma",), norm_gain_offset=1.0, **_LLAMA_PATHS, smooth_groups=_LLAMA_SMOOTH),
    Family(
        # Gemma-2/3 norm both sides of each sublayer: post_attention_layernorm normalizes the attention *output*;
        # the MLP's input norm is pre_feedforward_layernorm. Gains are 1 + w, as in Gemma.
        name="gemma2-like", model_types=("gemma2", "gemma3_text"),
        **{**_LLAMA_PATHS, "norm2": "pre_feedforward_layernorm"},
        norm_attn_out="post_attention_layernorm", norm_mlp_out="post_feedforward_layernorm", norm_gain_offset=1.0,
        smooth_groups=_LLAMA_SMOOTH,
    ),
    Family(
        # OLMo-2 is post-norm: post_attention_layernorm / post_feedforward_layernorm normalize the sublayer outputs,
        # so it has no norm1/norm2 (input norms) to address.
        name="olmo2", model_types=("olmo2",),
        **{**_LLAMA_PATHS, "norm1": None, "norm2": None},
        norm_attn_out="post_attention_layernorm", norm_mlp_out="post_feedforward_layernorm",
    ),
    Family(
        name="gpt2", model_types=("gpt2",),
        layers="transformer.h", attn="attn", norm1="ln_1", norm2="ln_2",
        down_proj="mlp.c_proj", embed="transformer.wte", final_norm="transformer.ln_f", down_proj_transposed=True,
        up_proj="mlp.c_fc", o_proj="attn.c_proj", smooth_groups=(("norm1", ("attn.c_attn",)), ("norm2", ("mlp.c_fc",))),
        layer_norm=True,
    ),
    Family(
        # OPT-125m, 1.3b, ... normalize before each sublayer (do_layer_norm_before).
        name="opt", model_types=("opt",), when=(("do_layer_norm_before", (True,)),),
        norm1="self_attn_layer_norm", norm2="final_layer_norm", final_norm="model.decoder.final_layer_norm",
        **_OPT_PATHS,
        smooth_groups=(("norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")), ("norm2", ("fc1",))),
    ),
    Family(
        # OPT-350m normalizes after each residual add (post-LN): its norms are not sublayer inputs, so there is no
        # norm1/norm2 to address, and no final norm.
        name="opt-post-ln", model_types=("opt",), when=(("do_layer_norm_before", (False,)),),
        norm1=None, norm2=None, final_norm=None, **_OPT_PATHS,
    ),
    Family(
        # Falcon-40B/180B (new_decoder_architecture, two norms in parallel): ln_attn feeds attention, ln_mlp the MLP,
        # both from the block input.
        name="falcon-parallel-2ln", model_types=("falcon",),
        when=(("new_decoder_architecture", (True,)), ("num_ln_in_parallel_attn", (None, 2))),
        norm1="ln_attn", norm2="ln_mlp", parallel_blocks=True, **_FALCON_PATHS,
        smooth_groups=_FALCON_NORM_PER_SUBLAYER_SMOOTH,
    ),
    Family(
        # Falcon-7B (parallel_attn): one input_layernorm feeds attention and the MLP; there is no MLP input norm.
        name="falcon-parallel", model_types=("falcon",), when=(("parallel_attn", (True,)),),
        norm1="input_layernorm", norm2=None, parallel_blocks=True, **_FALCON_PATHS,
        smooth_groups=(("norm1", ("self_attention.query_key_value", "mlp.dense_h_to_4h")),),
    ),
    Family(
        # Falcon-RW (sequential blocks, as Llama's).
        name="falcon", model_types=("falcon",), when=(("parallel_attn", (False,)),),
        norm1="input_layernorm", norm2="post_attention_layernorm", **_FALCON_PATHS,
        smooth_groups=_FALCON_NORM_PER_SUBLAYER_SMOOTH,
    ),
    # Mixtures of experts (fused experts, models/experts.py observes them per expert).
    Family(name="mixtral-like", model_types=("mixtral", "olmoe", "qwen3_moe"), **_MOE_PATHS),
    Family(name="qwen2-moe", model_types=("qwen2_moe",), **_MOE_PATHS, shared_expert="mlp.shared_expert"),
    Family(
        # Multi-head latent attention: the first norm feeds the query (LoRA q_a_proj, or q_proj) and the compressed
        # key/value projection.
        name="deepseek-v3", model_types=("deepseek_v3",), shared_expert="mlp.shared_experts",
        **{**_MOE_PATHS, "smooth_groups": (("norm1", ("self_attn.q_a_proj", "self_attn.q_proj",
                                                      "self_attn.kv_a_proj_with_mqa")), _LLAMA_SMOOTH[1])},
    ),
    # PhiMoE and gpt-oss call their router `router` (gpt-oss's experts: transposed, biased, interleaved gate/up).
    Family(name="moe-router", model_types=("phimoe", "gpt_oss"), **{**_MOE_PATHS, "router": "mlp.router"}),
    Family(
        # GPT-NeoX / Pythia with use_parallel_residual (every Pythia size): x + attn(ln1(x)) + mlp(ln2(x)), both norms
        # read the block input. Rotary covers only part of each head (rotary_pct; the attention module applies it).
        name="gpt-neox-parallel", model_types=("gpt_neox",), when=(("use_parallel_residual", (True,)),),
        parallel_blocks=True, **_NEOX_PATHS,
    ),
    Family(name="gpt-neox", model_types=("gpt_neox",), when=(("use_parallel_residual", (False,)),), **_NEOX_PATHS),
    Family(
        # BERT-style encoders (BertModel, loaded without a head; all-MiniLM-L6-v2): post-LN, each LayerNorm comes
        # after a residual add, so there are no norm1/norm2 and no final norm. attn is the self-attention module
        # that calls the attention function (its output is the heads' context before attention.output.dense).
        name="bert", model_types=("bert",), encoder=True,
        layers="encoder.layer", attn="attention.self", norm1=None, norm2=None,
        norm_after_attn="attention.output.LayerNorm", norm_after_mlp="output.LayerNorm",
        down_proj="output.dense", embed="embeddings.word_embeddings", final_norm=None,
        up_proj="intermediate.dense", o_proj="attention.output.dense", layer_norm=True,
    ),
)


# Norm roles of a block over the residual stream's channels, in forward order (the ones a family has: `Sites.norms`).
NORM_ROLES = ("norm1", "norm_attn_out", "norm_after_attn", "norm2", "norm_mlp_out", "norm_after_mlp")
# Norms inside attention, over the head dimension (`Sites.all_norms(attention=True)`).
ATTENTION_NORM_ROLES = ("attn.q_norm", "attn.k_norm")


def supported_model_types() -> list[str]:
    return sorted({t for family in FAMILIES for t in family.model_types})


def family_for(config) -> Family:
    """The Family entry for a transformers config: the first of its model type whose `when` holds (or, for a bare
    model type, its first entry)."""
    model_type = config if isinstance(config, str) else config.model_type
    entries = [family for family in FAMILIES if model_type in family.model_types]
    if not entries:
        raise UnsupportedArchitecture(f"architecture '{model_type}' has no site table; supported model types: "
                                      f"{', '.join(supported_model_types())}")
    if isinstance(config, str):
        return entries[0]
    for family in entries:
        if family.matches(config):
            return family
    described = "; ".join(f"{family.name}: " + ", ".join(f"{key} in {list(allowed)}" for key, allowed in family.when)
                          for family in entries)
    raise UnsupportedArchitecture(f"this {model_type} config matches no {model_type} layout of the site table "
                                  f"({described})")

