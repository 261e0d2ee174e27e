"""Patch a module the moment it is first imported: the import hook of the test doubles'
`sitecustomize.py` files (tests/gpu_double, tests/pause_double), which Python runs at start-up in
every process with a double on its path (Ray's workers too). Importing the module there instead
would slow every such process. A double loads this file by its path (only the double's own folder
is on every process's path):

    runpy.run_path(str(Path(__file__).parent.parent / "patch_on_import.py"))["patch_on_import"](
        "ray.tune", patch)        # patch(module) runs once, right after ray.tune is executed
"""
import importlib.abc
import importlib.util
import sys


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, target: str, patch):
        self.target, self.patch = target, patch

    def find_spec(self, name, path, target=None):
        if name != self.target:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        sys.meta_path.insert(0, self)
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            self.patch(module)

        loader.exec_module = exec_and_patch
        return spec


def patch_on_import(target: str, patch) -> None:
    """Call `patch(module)` once module `target` has been executed, on its first import."""
    sys.meta_path.insert(0, _PatchOnImport(target, patch))
