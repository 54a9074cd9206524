"""Runtime choices named before torch loads: the weight formats `load(quant=…)` and `--quant` take (model/quantized.py
implements them) and the prompt chunk the engine prefills by (engine/scheduler.py). A leaf: the CLI and the memory
planner read them without importing torch."""

QUANT_CHOICES = ("none", "int8", "int4", "q8_0", "auto")

# Prompt tokens a step computes, and the size of a prompt's chunks (library and server alike). One forward per chunk
# has a fixed cost: at 512 a 660-token prompt prefilled 17% slower than in one forward (1,790 against 2,160 tok/s on
# the default model); 2048 keeps prompts of that size whole and stalls a server's decoding for about a second.
DEFAULT_PREFILL_TOKENS = 2048
