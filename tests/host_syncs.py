"""Count the points where a step waits for the device (device-to-host synchronisations), on CPU.

On CPU nothing waits, so the points are found by what they are: ops whose result the host must
read (`.item()`, `bool()`, `int()`: aten._local_scalar_dense; `.tolist()`) and ops whose output
size depends on tensor values (nonzero, boolean-mask indexing, masked_select, repeat_interleave
without output_size, unique, bincount). On CUDA each of these blocks the host until the device catches up
(what `torch.cuda.set_sync_debug_mode` reports there).
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_ALWAYS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.bincount.default,  # its output size is the data's max + 1 (CUDA reads it back)
}


def _is_sync(func, args, kwargs) -> bool:
    if func in _ALWAYS:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func is aten.index.Tensor:  # boolean masks need a nonzero
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


class HostSyncCounter(TorchDispatchMode):
    """`with HostSyncCounter() as c: ...` -> c.total, c.by_site (Counter of 'file:line op')."""

    def __init__(self) -> None:
        super().__init__()
        self.by_site: Counter[str] = Counter()
        self._tolist = torch.Tensor.tolist

    @property
    def total(self) -> int:
        return sum(self.by_site.values())

    def _record(self, what: str) -> None:
        # the innermost frame in our own code names the site
        frames = [f for f in traceback.extract_stack()[:-2] if "mythos_dist" in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 2)[-1]}:{frames[-1].lineno}" if frames else "?"
        self.by_site[f"{where} {what}"] += 1

    def __enter__(self):
        counter, tolist = self, self._tolist

        def counted_tolist(t: torch.Tensor):
            counter._record("tolist")
            return tolist(t)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self._record(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)
