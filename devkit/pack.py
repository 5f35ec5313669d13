"""Import the repository root as the package `sparge_attention`, the way ComfyUI imports a
custom-node folder, whatever the checkout's directory is called."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "sparge_attention"


def load_pack(name: str = NAME, root: Path = ROOT):
    """The pack at `root` (default this checkout) imported as the package `name`; another tree under
    another name serves the benchmarks that compare two builds in one process (bench/host_ab.py)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
