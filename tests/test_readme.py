"""The README's training script, run exactly as written (extracted from README.md)."""

import os
import pathlib
import re
import subprocess
import sys

from recis_jax.io import synthetic

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_script() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- readme-script -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its <!-- readme-script --> block"
    return m.group(1)


def test_readme_script_trains_and_evaluates(tmp_path):
    data = tmp_path / "data"
    synthetic.generate(data / "train", num_files=1, rows_per_file=3000, seed=0, vocab_size=2000)
    synthetic.generate(data / "eval", num_files=1, rows_per_file=1000, seed=1, model_seed=0, vocab_size=2000)
    script = tmp_path / "script.py"
    script.write_text(readme_script())
    env = dict(os.environ, DATA=str(data), WORKDIR=str(tmp_path / "work"), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("eval:")]
    assert line and "'auc'" in line[0], out.stdout
    assert (tmp_path / "work" / "metrics.jsonl").exists()
    assert any((tmp_path / "work" / "checkpoints").iterdir())
