"""Sphinx configuration for the remsh documentation.

Needs nothing but Sphinx itself: no extensions that fetch anything, no
intersphinx, and the package is not imported (the version is read from
``remsh/__init__.py`` as text).
"""

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(HERE, os.pardir, "remsh", "__init__.py"), encoding="utf-8") as f:
    _match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)

project = "remsh"
author = "the remsh developers"
copyright = "the remsh developers"
release = _match.group(1) if _match else "unknown"
version = ".".join(release.split(".")[:2])

extensions = []
root_doc = master_doc = "index"
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "requirements.txt"]
default_role = "literal"
highlight_language = "none"
pygments_style = "sphinx"
primary_domain = "py"

html_theme = "alabaster"
html_title = f"remsh {release}"
html_static_path = []
html_show_sourcelink = False
