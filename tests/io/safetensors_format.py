"""The safetensors format with struct and json only, for the PyTorch-driven tests
(torch_interop.py, released_models.py): files are written as the library writes them (header
padded so the data starts 8-byte aligned) and read back as a strict reader would check them."""

import json
import struct

import torch

# dtype name -> (torch dtype, bytes per element)
DTYPES = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2), "F64": (torch.float64, 8)}


def tensor_bytes(tensor, dtype):
    """Row-major little-endian bytes of `tensor` rounded to `dtype`."""
    t = tensor.detach().to(DTYPES[dtype][0]).contiguous().reshape(-1)
    if dtype in ("F16", "BF16"):
        return struct.pack(f"<{t.numel()}h", *t.view(torch.int16).tolist())
    return struct.pack(f"<{t.numel()}{'f' if dtype == 'F32' else 'd'}", *t.tolist())


def write_safetensors(path, tensors, metadata=None):
    """tensors: name -> tensor (written as F32) or name -> (tensor, dtype name)."""
    header = {"__metadata__": metadata} if metadata else {}
    data = bytearray()
    for name, value in tensors.items():
        tensor, dtype = value if isinstance(value, tuple) else (value, "F32")
        raw = tensor_bytes(tensor, dtype)
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + bytes(data))


def read_safetensors(path, dtype=torch.float32):
    """name -> tensor of `dtype` from a file of F32 tensors, checked strictly: string metadata,
    no other keys, tensors tiling the data exactly."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    data = raw[8 + n:]
    metadata = header.pop("__metadata__", {})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()), metadata
    out, end = {}, 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        assert set(entry) == {"dtype", "shape", "data_offsets"}, entry
        assert entry["dtype"] == "F32", entry
        begin, stop = entry["data_offsets"]
        count = 1
        for dim in entry["shape"]:
            count *= dim
        assert begin == end and stop - begin == 4 * count, (name, entry)
        values = struct.unpack(f"<{count}f", data[begin:stop])
        out[name] = torch.tensor(values, dtype=dtype).reshape(entry["shape"])
        end = stop
    assert end == len(data), "bytes no tensor covers"
    return out
