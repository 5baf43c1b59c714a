"""The README's Python API example runs as written (on the bundled model: slow)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    text = README.read_text()
    match = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "the README lost its API example"
    return match.group(1)


@pytest.mark.slow
def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    achieved = float(re.search(r"removed (\d\.\d+) of the decoder parameters", out).group(1))
    assert abs(achieved - 0.2) < 0.005

    from transformers import AutoModelForCausalLM

    import slimtune  # noqa: F401  (non-uniform models load through the registered slimtune_* types)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned-api")
    assert sum(p.numel() for p in model.parameters()) < 134_515_008
