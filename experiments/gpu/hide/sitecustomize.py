"""Kit dry run only: the packages the GPU machine lacks become invisible here, as they are there.

experiments/gpu/kit.py puts this folder on PYTHONPATH in --dry-run and names the distributions in
QATLAB_KIT_HIDE (comma-separated, e.g. "datasets,lm-eval"). Python imports `sitecustomize` at start-up;
from then on, for every top-level module that only hidden distributions provide, `import x`,
`importlib.util.find_spec("x")` and `importlib.metadata.version(...)` behave as for a package that is not
installed, so a code path that would need one on the GPU machine fails in the dry run instead of during
a lease. Never on PYTHONPATH on the GPU machine.
"""

import os
from importlib import metadata
from importlib.machinery import PathFinder


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


_HIDDEN_DISTS = {_norm(n) for n in os.environ.get("QATLAB_KIT_HIDE", "").split(",") if n.strip()}

if _HIDDEN_DISTS:
    # top-level module -> the distributions that provide it; hide a module only if all of them are hidden
    # (a namespace such as `google` is shared by hidden and present distributions)
    _HIDDEN = {module for module, dists in metadata.packages_distributions().items()
               if dists and all(_norm(d) in _HIDDEN_DISTS for d in dists)}
    _HIDDEN |= {n for n in _HIDDEN_DISTS if n.isidentifier()}  # e.g. lm_eval when named so, or not yet mapped
    _find_spec = PathFinder.find_spec
    _find_distributions = PathFinder.find_distributions

    def _hidden_find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] in _HIDDEN:
            return None
        return _find_spec(fullname, path, target)

    def _hidden_find_distributions(cls, *args, **kwargs):
        for dist in _find_distributions(*args, **kwargs):
            if _norm(dist.metadata["Name"] or "") not in _HIDDEN_DISTS:
                yield dist

    PathFinder.find_spec = classmethod(_hidden_find_spec)
    PathFinder.find_distributions = classmethod(_hidden_find_distributions)
