"""Simulated (quantize-dequantize) quantization: RTN quantizers (rtn.py), which matrices and inputs they act on
(targets.py), and SmoothQuant's smoothing factors (smoothing.py). The edits that apply them to a model are in
outlierlab.interventions.quant."""
