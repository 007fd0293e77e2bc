"""Outlier-guided fine-tuning (issue 17): does knowing where the outliers are make parameter-efficient fine-tuning
better? One method (finetune/method=...) on one task (finetune/task=cpt|boolq), the same optimizer, steps and tokens
for every method.

1. Before: the outlier atlas (super weights, massive activation, gamma and LLM.int8 channel outliers, OWL layer
   outlier ratios), PPL, W8A8 PPL, held-out accuracy (cached: the same for every method).
2. The method's parameter selection (src/outlierlab/finetune/methods.py), trained by one resumable loop.
3. LoRA merged; the model saved as an HF directory at exp.output_dir (model=trained model.source=<dir>).
4. After: the same measurements; which outliers survived; one table row.
"""
from __future__ import annotations

from outlierlab.finetune.study import Study
from outlierlab.finetune.study import check as check_finetune


def check(cfg, plan) -> None:
    check_finetune(cfg, plan.data_dir)


def run(ctx) -> dict:
    return Study(ctx).run()
