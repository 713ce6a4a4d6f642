"""Packaging for remsh.

The slave side needs only the Python standard library, so there are no
install requirements; the SSH transport needs paramiko (``pip install
remsh[ssh]``), the master's web dashboard Starlette and uvicorn
(``remsh[web]``), a master on a PostgreSQL job store psycopg
(``remsh[postgres]``).
"""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "remsh", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.M)
    if match is None:
        raise RuntimeError("cannot find __version__ in remsh/__init__.py")
    return match.group(1)


def read_long_description():
    with open(os.path.join(HERE, "README.rst"), encoding="utf-8") as f:
        return f.read()


setup(
    name="remsh",
    version=read_version(),
    description="Run commands and move files on many machines from one Python master process",
    long_description=read_long_description(),
    long_description_content_type="text/x-rst",
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*", "docs", "docs.*"]),
    package_data={"remsh": ["py.typed", "web/static/*", "web/pages/*"]},
    include_package_data=False,
    zip_safe=False,
    python_requires=">=3.9",
    install_requires=[],
    extras_require={
        "ssh": ["paramiko>=2.10"],
        # the master's web dashboard (remsh master --http)
        "web": ["starlette>=0.37", "uvicorn>=0.29"],
        # several masters on one PostgreSQL job store (remsh master --store postgresql://...)
        "postgres": ["psycopg[binary]>=3.2"],
    },
    entry_points={
        "console_scripts": [
            "remsh=remsh.cli:main",
            "remsh-slave=remsh.slave.main:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Operating System :: POSIX",
        "Topic :: System :: Distributed Computing",
        "Topic :: System :: Systems Administration",
        "Typing :: Typed",
    ],
)
