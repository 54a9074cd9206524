"""Reading a checkpoint's description (`qwen info`: config, tensor types, tokenizer, chat template, sampling
defaults) imports no torch, so it answers at once; only `tensors()` needs it."""

from __future__ import annotations

import subprocess
import sys

from tiny import hf_config, random_model, write_hf_checkpoint

DESCRIBE = """
import sys
from qwen_engine.checkpoint import open_checkpoint
for path in sys.argv[1:]:
    checkpoint = open_checkpoint(path)
    info = checkpoint.info()
    tokenizer = checkpoint.tokenizer()
    checkpoint.chat_template(tokenizer).prompt_ids([{"role": "user", "content": "Hi"}], tokenizer)
    checkpoint.sampling_defaults()
    print(info.format, info.tensor_types)
print("torch imported:", "torch" in sys.modules)
"""


def test_describing_a_checkpoint_imports_no_torch(tiny_gguf, tokenizer_files, tmp_path) -> None:
    config = hf_config("qwen1.5", hidden_size=32, intermediate_size=64)
    directory = write_hf_checkpoint(tmp_path / "hf", random_model(config), tokenizer_files)
    done = subprocess.run([sys.executable, "-c", DESCRIBE, str(tiny_gguf), str(directory)],
                          capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("gguf {'F32'") and lines[1].startswith("hf {'F32'")  # both were read
    assert lines[-1] == "torch imported: False"
