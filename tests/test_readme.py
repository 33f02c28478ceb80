"""The README's example runs, and its set-up commands are the ones CI uses."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_example_runs(capsys):
  blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
  assert blocks, "README has no python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
  printed = capsys.readouterr().out
  assert "params/layers_0/kernel" in printed
  assert float(namespace["loss"]) > 0


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
  commands = re.findall(r"^pip install -e .*$", README, flags=re.M)
  assert commands == [
      'pip install -e ".[examples]" && python -m gradtx.tour',
      'pip install -e ".[dev]" && pytest -x -q',
  ]
  assert commands[1] in (ROOT / ".ci" / "run").read_text()
