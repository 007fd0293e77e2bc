"""Paper SW Fig. 3 (down_proj input/output spikes per layer) and Fig. 4 (max |residual| per layer with the super
weight, the other outlier weights, or both removed).

1. Find the super weights (detection always runs; `exp.super_weights` picks detected or registry ones).
2. Fig. 3: max |input| and |output| of every down_proj on the detection prompt, unedited model.
3. Fig. 4: for each variant (interventions applied in order, then undone), max |residual| after every layer over
   `exp.prompts`.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from outlierlab.interventions.super_weight import NoSuperWeights
from outlierlab.probes.super_weight import down_proj_profile, residual_profile
from outlierlab.studies.super_weights import SuperWeightChoice
from outlierlab.tables import Table, columns


def run(ctx) -> dict:
    cfg = ctx.cfg.exp
    weights = SuperWeightChoice.of(ctx)
    down_proj = down_proj_profile(ctx.loaded, cfg.detection.prompt)

    prompts = list(cfg.prompts)
    residual, edits, rows = {}, {}, []
    for variant, names in cfg.variants.items():
        try:
            with ctx.edit(list(names), weights.context) as session:
                residual[variant] = residual_profile(ctx.loaded, prompts)
                edits[variant] = list(session.log)
        except NoSuperWeights:
            rows.append({"variant": variant, "note": "skipped: no super weight"})
            continue
        peak = max(residual[variant], key=lambda layer: layer["max_abs"])
        rows.append({"variant": variant, "max_abs_h": peak["max_abs"], "layer": peak["layer"],
                     "channel": peak["channel"], "final_layer_max_abs_h": residual[variant][-1]["max_abs"]})
    baseline = residual.get("original")
    for row in rows:
        if baseline and "max_abs_h" in row:
            row["x_original"] = row["max_abs_h"] / max(layer["max_abs"] for layer in baseline)

    spike = max(down_proj, key=lambda layer: layer["output_max"]["abs"])
    shown = columns("variant", ("max_abs_h", "max abs(h)"), "layer", "channel",
                    ("final_layer_max_abs_h", "final layer max abs(h)"), ("x_original", "x original"),
                    *(["note"] if any("note" in row for row in rows) else []))
    caption = (f"max |residual| over layers on {len(prompts)} prompt(s); super weights {weights.describe()}; "
               f"largest down_proj output spike: layer {spike['layer']}, "
               f"{spike['output_max']['value']:.1f} in channel {spike['output_max']['channel']} from input "
               f"{spike['input_at_output_peak']['value']:.1f} in channel {spike['input_at_output_peak']['channel']}")
    return {
        **weights.record(),
        "prompts": prompts,
        "down_proj_profile": down_proj,
        "residual_profile": residual,
        "variants": {variant: {"interventions": list(cfg.variants[variant]), "edits": edits[variant]}
                     for variant in residual},
        "paper_reference": OmegaConf.to_container(cfg.reference) if cfg.get("reference") else None,
        "table": Table(shown, rows, index="variant", caption=caption).to_dict(),
    }
