"""Readers for checkpoint files: lazy views from key to shape, with tensors loaded one at a time on request.

Formats: safetensors (read by memory map, including bfloat16, which numpy lacks), PyTorch pickles (`.ckpt`, `.pt`,
`.pth`, `.bin`; needs torch), MindSpore `.ckpt`, and the diffusers folder layout (`unet/`, `vae/`, `image_encoder/`).
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Iterator, Mapping

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message is meant for the user."""


_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # widened to float32 on read
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def bf16_to_fp32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32: bfloat16 is the upper half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class State(Mapping):
    """A read-only mapping name -> numpy array whose `shapes` are known before any tensor is read."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], loader, description: str):
        self.shapes = shapes
        self._loader = loader
        self.description = description

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.shapes:
            raise KeyError(key)
        return self._loader(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def read_safetensors(path: str) -> State:
    """Parse the header (8-byte length + JSON) and memory-map the data; checks that the file is complete."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path} is not a valid safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path} has a damaged safetensors header: {e}") from e
    header.pop("__metadata__", None)
    base = 8 + n
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if base + end > size:
        raise CheckpointError(f"{path} is truncated: {size} bytes, the header describes {base + end}")
    data = np.memmap(path, dtype=np.uint8, mode="r")

    def load(key: str) -> np.ndarray:
        info = header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        lo, hi = info["data_offsets"]
        arr = np.frombuffer(data[base + lo : base + hi], dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        return bf16_to_fp32(arr) if info["dtype"] == "BF16" else arr

    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    return State(shapes, load, path)


def read_torch(path: str) -> State:
    """A PyTorch pickle (optionally under `state_dict`); torch is needed only for this format."""
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path} is a PyTorch pickle; reading it needs torch (pip install torch==2.13.0), "
            "or convert it to .safetensors first"
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged files
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    tensors = {k: v for k, v in obj.items() if hasattr(v, "shape")}

    def load(key: str) -> np.ndarray:
        t = tensors[key].detach()
        return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()

    return State({k: tuple(v.shape) for k, v in tensors.items()}, load, path)


def read_mindspore(path: str) -> State:
    import mindspore as ms

    try:
        params = ms.load_checkpoint(path)
    except Exception as e:  # MindSpore raises ValueError/RuntimeError for damaged files
        raise CheckpointError(f"{path} is not a readable MindSpore checkpoint (damaged or truncated?): {e}") from e
    return State({k: tuple(v.shape) for k, v in params.items()}, lambda k: params[k], path)


def is_torch_pickle(path: str) -> bool:
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def read_file(path: str) -> State:
    """Open one checkpoint file, choosing the reader from its content."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if is_torch_pickle(path):
        return read_torch(path)
    return read_mindspore(path)


DIFFUSERS_PARTS = {
    "unet": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
    ),
    "vae": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
    ),
    "image_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin"),
}


def read_diffusers_folder(path: str) -> dict[str, State]:
    """The weights of a diffusers SVD folder, one State per component."""
    parts = {}
    for part, names in DIFFUSERS_PARTS.items():
        for name in names:
            f = os.path.join(path, part, name)
            if os.path.isfile(f):
                parts[part] = read_file(f)
                break
        else:
            raise CheckpointError(f"{path} is not a diffusers SVD folder: no {part}/{names[0]}")
    return parts
