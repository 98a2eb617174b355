"""Model offload: each part of the engine holds its weights only while its stage runs.

A generation uses its parts one after another: the conditioner (the CLIP image tower and the conditioning-frame
encoder), then the UNet for every sampling step, then the VAE decoder. With offload on, the idle parts' weights
live in .npy files in a folder and the process holds only the running part's, so the peak is set by the largest
part (the UNet) instead of all of them together. The files are written once, the first time a part goes idle;
each later stage reads its part back (from the page cache when memory allows).

It frees memory in PyNative mode only: a compiled graph keeps the weights it was compiled with alive.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

_EMPTY = np.zeros((1,), np.float32)


class ModelOffload:
    """Swap named cells' parameters between memory and one folder of .npy files; `use(name)` makes `name` the only
    part in memory."""

    def __init__(self, parts: dict[str, nn.Cell], folder: str | None = None, release: bool = True):
        if ms.get_context("mode") != ms.PYNATIVE_MODE:
            raise ValueError("model offload needs PyNative mode (mode=1): a compiled graph keeps its weights")
        self.parts = parts
        self.folder = folder or tempfile.mkdtemp(prefix="svd_offload_")
        self._own_folder = folder is None
        self._params = {name: list(cell.get_parameters()) for name, cell in parts.items()}
        self._shapes = {name: [(tuple(p.shape), p.dtype) for p in ps] for name, ps in self._params.items()}
        self._written: set[str] = set()
        self.resident = set(parts)
        if release:  # every part written before any is freed: a failed write (a full disk) loses nothing
            for name in parts:
                self._write(name)
            for name in parts:
                self.release(name)

    def _path(self, name: str, i: int) -> str:
        return os.path.join(self.folder, name, f"{i:05d}.npy")

    def _write(self, name: str) -> None:
        if name in self._written:
            return
        os.makedirs(os.path.join(self.folder, name), exist_ok=True)
        for i, p in enumerate(self._params[name]):
            data = p if p.dtype != ms.bfloat16 else p.astype(ms.float32)  # numpy has no bfloat16
            np.save(self._path(name, i), data.asnumpy())
        self._written.add(name)

    def release(self, name: str) -> None:
        """Move `name`'s weights to the folder (written the first time only: generation does not change them) and
        free them."""
        if name not in self.resident:
            return
        self._write(name)
        # a parameter that another resident part shares (the image encoder of the conditioner and the VAE) stays
        kept = {id(p) for other in self.resident - {name} for p in self._params[other]}
        for p in self._params[name]:
            if id(p) not in kept:
                p.set_data(Tensor(_EMPTY).astype(p.dtype), slice_shape=True)
        self.resident.discard(name)

    def load(self, name: str) -> None:
        """Read `name`'s weights back into memory."""
        if name in self.resident:
            return
        for i, (p, (shape, dtype)) in enumerate(zip(self._params[name], self._shapes[name])):
            arr = np.load(self._path(name, i))
            if arr.shape != shape:
                raise RuntimeError(f"offload file {self._path(name, i)} holds {arr.shape}, expected {shape}")
            p.set_data(Tensor(arr).astype(dtype), slice_shape=True)
        self.resident.add(name)

    def use(self, name: str) -> None:
        """Release every other part, then load `name`."""
        for other in self.parts:
            if other != name:
                self.release(other)
        self.load(name)

    def restore(self) -> None:
        """Every part back in memory; the folder is removed if this object made it."""
        for name in self.parts:
            self.load(name)
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __del__(self):
        if getattr(self, "_own_folder", False):
            shutil.rmtree(self.folder, ignore_errors=True)
