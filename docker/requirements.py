"""Print the requirements of the given extras from pyproject.toml, one per line.

The Docker image installs dependencies in a layer of their own, before the code is copied, so that a code
edit does not reinstall them. This keeps pyproject.toml the one place where dependencies are listed:

    python docker/requirements.py serve > requirements.txt
"""

import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
