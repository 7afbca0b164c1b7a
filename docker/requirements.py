"""Print the requirements of the given extras from pyproject.toml, one per line.

The Docker image installs dependencies in a layer of their own, before the code is copied, so that a code
edit does not reinstall them. This keeps pyproject.toml the one place where dependencies are listed:

    python docker/requirements.py serve > requirements.txt

An extra that names the project itself (`vae-serving[http]`) is expanded in place, as pip would.
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
SELF = re.compile(re.escape(project["name"]) + r"\[([^\]]+)\]")


def requirements(extra: str) -> list[str]:
    found: list[str] = []
    for requirement in project["optional-dependencies"][extra]:
        if match := SELF.fullmatch(requirement):
            for inner in match[1].split(","):
                found += requirements(inner.strip())
        else:
            found.append(requirement)
    return found


lines = list(project["dependencies"])
for extra in sys.argv[1:]:
    lines += [line for line in requirements(extra) if line not in lines]
print("\n".join(lines))
