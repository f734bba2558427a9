"""Print one of the two Quick start commands of README.md: `demo` (the first) or `test` (the second).

The Quick start's first fenced block must hold exactly two commands; anything else is an error,
so CI fails loudly when the README changes shape."""

import pathlib
import re
import sys

text = pathlib.Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
section = text.split("## Quick start", 1)[1]
block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S).group(1)
commands = [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
if len(commands) != 2:
    sys.exit(f"README Quick start must hold exactly two commands, found {len(commands)}: {commands}")
print(commands[{"demo": 0, "test": 1}[sys.argv[1]]])
