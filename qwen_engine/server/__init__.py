"""An OpenAI-compatible HTTP server (`qwen serve`) over the serving engine (engine/serving.py)."""
