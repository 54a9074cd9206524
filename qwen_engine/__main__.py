"""`python -m qwen_engine …` is the `qwen` command (what torchrun launches: `torchrun … -m qwen_engine serve …`)."""

import sys

from .cli import main

sys.exit(main())
