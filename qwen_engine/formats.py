"""The runtime weight formats by name, as `load(quant=…)` and `--quant` take them (a leaf: the CLI lists them
without importing torch; model/quantized.py implements them)."""

QUANT_CHOICES = ("none", "int8", "int4", "q8_0", "auto")
