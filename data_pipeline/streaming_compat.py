"""The one place that imports mosaicml-streaming; every other module imports it from here.

`import streaming` eagerly imports three sub-packages we never use:
- `streaming.vision` imports torchvision, which is not installed beside our CPU torch (PyPI's wheel
  cannot load with it), so the import fails;
- `streaming.text` imports transformers' AutoTokenizer (and through it sklearn): ~3 s per process;
- `streaming.multimodal` is imported for completeness of the package namespace.
We register empty stand-ins for them before the first `import streaming`. DataLoader workers started
with `spawn` import this module before unpickling streaming objects because our dataset class lives in
`data_pipeline.loader`, which imports this module first.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def _stub(name: str) -> None:
    if name not in sys.modules:
        sys.modules[name] = types.ModuleType(name, f"empty stand-in registered by {__name__}")


def _torchvision_importable() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # a wheel built for another torch fails with OSError/RuntimeError, not ImportError
        return False
    return True


if "streaming" not in sys.modules:
    if not _torchvision_importable():
        _stub("streaming.vision")
    _stub("streaming.text")
    _stub("streaming.multimodal")

import streaming  # noqa: E402
from streaming import MDSWriter, StreamingDataLoader, StreamingDataset  # noqa: E402
from streaming.base.constant import SHM_TO_CLEAN  # noqa: E402  (names of its shared-memory segments)

__all__ = ["SHM_TO_CLEAN", "MDSWriter", "StreamingDataLoader", "StreamingDataset", "streaming"]
