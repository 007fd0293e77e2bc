"""Fine-tuning guided by (or protecting) the outliers: atlas measurements, parameter selections, one training loop,
the two tasks, and the +exp=finetune study."""
