"""benchmarks/results.py: each benchmark script rewrites only its own section of RESULTS.md."""

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("results", Path(__file__).parents[1] / "benchmarks" / "results.py")
results = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(results)


def test_a_section_is_added_then_replaced_leaving_the_others(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    results.update_section("engines", "## Engines\n\nold figures", path)
    results.update_section("serving", "## Serving\n\n4.8×", path)
    results.update_section("engines", "## Engines\n\nnew figures\n", path)
    text = path.read_text()
    assert text.startswith(results.HEADER)
    assert "new figures" in text and "old figures" not in text and "4.8×" in text
    assert text.index("## Engines") < text.index("## Serving")  # a replaced section keeps its place
    assert text.count("<!-- begin engines -->") == 1 and text.count("<!-- end engines -->") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]  # no temporary left behind
