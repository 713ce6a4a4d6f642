"""Sphinx configuration for the remsh documentation.

Needs nothing but Sphinx itself: no extensions that fetch anything, no
intersphinx.  One local extension (``_ext/remsh_docgen.py``) writes the
protocol's summary of operations and the master's method signatures from
the code; the version is read from ``remsh/__init__.py`` as text.
"""

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))

with open(os.path.join(HERE, os.pardir, "remsh", "__init__.py"), encoding="utf-8") as f:
    _match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)

project = "remsh"
author = "the remsh developers"
copyright = "the remsh developers"
release = _match.group(1) if _match else "unknown"
version = ".".join(release.split(".")[:2])

extensions = ["remsh_docgen"]
root_doc = master_doc = "index"
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store", "requirements.txt"]
default_role = "literal"
highlight_language = "none"
pygments_style = "sphinx"
primary_domain = "py"

html_theme = "alabaster"
html_title = f"remsh {release}"
html_static_path = []
html_show_sourcelink = False
