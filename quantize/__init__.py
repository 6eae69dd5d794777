"""Offline FP8 quantization of HF Nemotron checkpoints (`n4 quantize`): streaming conversion, calibration and a
minimal safetensors writer. The checkpoint format itself is defined once, in model/quant.py."""
