"""Kit dry run only: the packages the GPU machine lacks become invisible here, as they are there.

experiments/gpu/kit.py puts this folder on PYTHONPATH in --dry-run and names the packages in
QATLAB_KIT_HIDE (comma-separated import names). Python imports `sitecustomize` at start-up; from then
on `import x`, `importlib.util.find_spec("x")` and `importlib.metadata.version("x")` behave for a
hidden x exactly as for a package that is not installed, so a code path that would need one on the
GPU machine fails in the dry run instead of during a lease. Never on PYTHONPATH on the GPU machine.
"""

import os
from importlib.machinery import PathFinder

_HIDDEN = {name.strip() for name in os.environ.get("QATLAB_KIT_HIDE", "").split(",") if name.strip()}


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


if _HIDDEN:
    _hidden_dists = {_norm(name) for name in _HIDDEN}
    _find_spec = PathFinder.find_spec
    _find_distributions = PathFinder.find_distributions

    def _hidden_find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] in _HIDDEN:
            return None
        return _find_spec(fullname, path, target)

    def _hidden_find_distributions(cls, *args, **kwargs):
        for dist in _find_distributions(*args, **kwargs):
            if _norm(dist.metadata["Name"] or "") not in _hidden_dists:
                yield dist

    PathFinder.find_spec = classmethod(_hidden_find_spec)
    PathFinder.find_distributions = classmethod(_hidden_find_distributions)
