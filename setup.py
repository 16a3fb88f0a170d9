"""The wheel carries the repository's checkpoints/ (HD's databases, AdaDecode's heads) inside the package, as
`hdjax/_checkpoints`, where `hdjax.assets` finds them in an install. Everything else is in pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCheckpoints(build_py):

  def run(self):
    super().run()
    if not self.editable_mode:  # an editable install reads the checkout's own checkpoints/
      self.copy_tree("checkpoints", os.path.join(self.build_lib, "hdjax", "_checkpoints"))


setup(cmdclass={"build_py": BuildPyWithCheckpoints})
