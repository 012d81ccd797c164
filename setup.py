"""Package discovery for the two plugin folders at the top level (the rest of the metadata is in pyproject.toml).

The built-in methods live in ``methods/`` and the task suites in ``tasks/`` (one file each: "add a method" is
"add a file to methods/"), and install as ``peftbench.methods`` and ``peftbench.tasks``. setuptools' static
``packages.find`` cannot find sub-packages of a remapped folder, so they are listed here from the folders
themselves: a new method folder needs no edit of any packaging file.
"""
from setuptools import find_packages, setup

PLUGIN_DIRS = {"peftbench.methods": "methods", "peftbench.tasks": "tasks"}

packages = find_packages(include=["peftbench", "peftbench.*"])
for name, folder in PLUGIN_DIRS.items():
    packages += [name] + [f"{name}.{p}" for p in find_packages(where=folder)]

setup(packages=packages, package_dir=dict(PLUGIN_DIRS))
