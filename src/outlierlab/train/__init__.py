"""Small-model pretraining with attention variants (paper MA's explicit attention bias, paper QT's clipped softmax
and gated attention, a sink token, paper RO's L1 on norm gamma)."""
