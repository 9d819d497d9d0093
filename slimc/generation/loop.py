"""The generation loop: prefill, then decode one token at a time against a preallocated cache.

Standalone on purpose (numpy and ``tvm_ffi`` only): the same file runs on the host and, as a
script, inside ``qemu-aarch64`` with the guest's Python, where slimc is not importable. As a
script (``python loop.py model.so request.json``) it prints one JSON line per generated token
(``{"token": id}``) and a final ``{"done": ..., stats}`` line, so the host can stream text.

The cache is owned here: one 64-byte aligned numpy array per layer for keys and one for values,
``[1, kv_heads, max_len, head_dim]``, wrapped zero-copy as TVM tensors once. The compiled
functions return only the new rows; they are written in at ``pos`` with a numpy slice.

On a GPU (``device`` given, e.g. a CUDA artifact) the cache tensors live on that device instead
and never cross to the host: the new rows the step returns (already on the device) are copied
into the cache with device-to-device copies, one contiguous ``[valid, head_dim]`` block per KV
head; only the token ids/positions go up and only the logits come back.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import tvm_ffi

_ALIGN = 64


def aligned_zeros(shape: Sequence[int], dtype: str = "float32") -> np.ndarray:
    """A zeroed C-contiguous array whose data is 64-byte aligned (TVM kernels assume it)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.zeros(nbytes + _ALIGN, dtype=np.uint8)
    offset = -buf.ctypes.data % _ALIGN
    return buf[offset: offset + nbytes].view(dtype).reshape(shape)


def as_tensor(array: np.ndarray):
    """Zero-copy TVM view of an aligned, contiguous numpy array."""
    return tvm_ffi.from_dlpack(array, require_alignment=_ALIGN, require_contiguous=True)


@dataclass
class Sampling:
    """Greedy when ``temperature`` is 0; else temperature, then top-k, then top-p (nucleus)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def picker(self) -> Callable[[np.ndarray], int]:
        if self.temperature <= 0:
            return lambda logits: int(np.argmax(logits))
        rng = np.random.default_rng(self.seed)

        def pick(logits: np.ndarray) -> int:
            z = logits.astype(np.float64) / self.temperature
            if 0 < self.top_k < z.size:
                kth = np.partition(z, -self.top_k)[-self.top_k]
                z = np.where(z < kth, -np.inf, z)
            p = np.exp(z - z.max())
            p /= p.sum()
            if self.top_p < 1.0:
                order = np.argsort(-p)
                keep = np.cumsum(p[order]) - p[order] < self.top_p
                mask = np.zeros_like(p, dtype=bool)
                mask[order[keep]] = True
                p = np.where(mask, p, 0.0)
                p /= p.sum()
            return int(rng.choice(p.size, p=p))

        return pick


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = "length"
    first_logits: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("prompt_tokens", "new_tokens", "prefill_s",
                                           "decode_s", "stop_reason")}
        d["prefill_tokens_per_s"] = self.prompt_tokens / self.prefill_s if self.prefill_s else None
        steps = max(self.new_tokens - 1, 0)  # the first new token comes from prefill
        d["decode_tokens_per_s"] = steps / self.decode_s if self.decode_s and steps else None
        return d


class Generator:
    """Runs a generation artifact's ``prefill``/``decode`` through ``vm`` (a Relax VM)."""

    def __init__(self, vm, spec: dict, device=None) -> None:
        """``device``: a TVM device other than the CPU (the VM's) to keep the cache on."""
        self.vm, self.spec = vm, spec
        self.layers, self.kv_heads = int(spec["layers"]), int(spec["kv_heads"])
        self.head_dim, self.max_len = int(spec["head_dim"]), int(spec["max_length"])
        self.chunk = int(spec["prefill_length"])
        self.shape = (1, self.kv_heads, self.max_len, self.head_dim)
        self.device = device
        if device is None:
            self.caches = [aligned_zeros(self.shape) for _ in range(2 * self.layers)]
            self.cache_tensors = [as_tensor(c) for c in self.caches]
        else:
            import tvm  # host only: the qemu guest never gets a device

            self._tvm = tvm
            self.cache_tensors = [tvm.runtime.empty(self.shape, "float32", device)
                                  for _ in range(2 * self.layers)]
            self.caches = []
        self._prefill, self._decode = vm["prefill"], vm["decode"]
        # Decode's token / position inputs: written in place each step, wrapped once.
        self._token, self._pos = aligned_zeros((1, 1), "int64"), aligned_zeros((1,), "int64")
        self._step_inputs = [as_tensor(self._token), as_tensor(self._pos)] \
            if device is None else None

    def _clear(self) -> None:
        if self.device is None:
            for cache in self.caches:
                cache[...] = 0
            return
        zeros = np.zeros(self.shape, np.float32)
        for tensor in self.cache_tensors:
            tensor.copyfrom(zeros)

    def _scalars(self, *arrays: np.ndarray) -> list:
        if self.device is None:
            return [as_tensor(_aligned(a)) for a in arrays]
        return [self._tvm.runtime.tensor(np.require(a, requirements="C"), device=self.device)
                for a in arrays]

    def _run(self, fn, ids: np.ndarray, pos: int, last: int | None, valid: int) -> np.ndarray:
        arrays = [ids, np.array([pos], np.int64)]
        if last is not None:
            arrays.append(np.array([last], np.int64))
        out = list(fn(*self._scalars(*arrays), *self.cache_tensors))
        if self.device is None:
            for cache, rows in zip(self.caches, out[1:], strict=True):
                cache[:, :, pos: pos + valid] = np.from_dlpack(rows)[:, :, :valid]
            return np.from_dlpack(out[0]).reshape(-1).copy()
        for cache, rows in zip(self.cache_tensors, out[1:], strict=True):
            self._write_rows(cache, rows, pos, valid)
        return out[0].numpy().reshape(-1)

    def _write_rows(self, cache, rows, pos: int, valid: int) -> None:
        """``cache[0, h, pos:pos+valid] = rows[0, h, :valid]`` for every head, on the device:
        each side of a head's block is contiguous, so it is one device-to-device copy."""
        steps, width = int(rows.shape[2]), self.head_dim * 4  # float32 row bytes
        for h in range(self.kv_heads):
            src = rows._create_view((valid, self.head_dim), "float32",
                                    h * steps * width)
            dst = cache._create_view((valid, self.head_dim), "float32",
                                     (h * self.max_len + pos) * width)
            src.copyto(dst)

    def prefill(self, prompt: Sequence[int]) -> np.ndarray:
        """Fill the cache with ``prompt`` (in chunks of the compiled length); last logits."""
        logits = None
        for start in range(0, len(prompt), self.chunk):
            piece = list(prompt[start: start + self.chunk])
            ids = np.zeros((1, self.chunk), np.int64)
            ids[0, : len(piece)] = piece
            logits = self._run(self._prefill, ids, start, len(piece) - 1, len(piece))
        return logits

    def decode(self, token: int, pos: int) -> np.ndarray:
        if self._step_inputs is None:
            return self._run(self._decode, np.array([[token]], np.int64), pos, None, 1)
        self._token[0, 0], self._pos[0] = token, pos
        out = self._decode(*self._step_inputs, *self.cache_tensors)
        for cache, rows in zip(self.caches, out[1:], strict=True):
            cache[:, :, pos] = np.from_dlpack(rows)[:, :, 0]
        return np.from_dlpack(out[0]).reshape(-1).copy()

    def generate(self, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling,
                 stop_ids: Sequence[int] = (), on_token: Callable[[int], None] = lambda t: None,
                 ) -> tuple[list[int], Stats]:
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if len(prompt) + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)}) + new tokens ({max_new_tokens}) exceed "
                             f"the compiled cache length {self.max_len}")
        pick, stats, tokens = sampling.picker(), Stats(prompt_tokens=len(prompt)), []
        self._clear()
        t0 = time.perf_counter()
        logits = self.prefill(prompt)
        stats.prefill_s = time.perf_counter() - t0
        stats.first_logits = logits.tolist()
        pos, t0 = len(prompt), time.perf_counter()
        while len(tokens) < max_new_tokens:
            token = pick(logits)
            tokens.append(token)
            on_token(token)
            if token in stop_ids:
                stats.stop_reason = "stop_token"
                break
            if len(tokens) == max_new_tokens:
                break
            logits = self.decode(token, pos)
            pos += 1
        stats.decode_s = time.perf_counter() - t0
        stats.new_tokens = len(tokens)
        return tokens, stats


def _aligned(array: np.ndarray) -> np.ndarray:
    out = aligned_zeros(array.shape, str(array.dtype))
    out[...] = array
    return out


def _load_guest_vm(library: str):
    """Load ``library`` into a Relax VM with only ``libtvm_runtime`` (see emulated_runner)."""
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the tvm package is not on sys.path")
    for pkg_dir in spec.submodule_search_locations:
        for sub in ("lib", "lib64", ""):
            path = os.path.join(pkg_dir, sub, "libtvm_runtime.so")
            if os.path.exists(path):
                ctypes.CDLL(path, ctypes.RTLD_GLOBAL)
                vm = tvm_ffi.load_module(library)["vm_load_executable"]()
                vm["vm_initialization"](1, 0, 2)  # kDLCPU, device 0, pooled allocator
                return vm
    raise RuntimeError("libtvm_runtime.so not found")


def main(library: str, request_path: str) -> None:
    with open(request_path) as f:
        request = json.load(f)
    generator = Generator(_load_guest_vm(library), request["spec"])

    def emit(token: int) -> None:
        print(json.dumps({"token": token}), flush=True)

    tokens, stats = generator.generate(request["prompt"], request["max_new_tokens"],
                                       Sampling(**request["sampling"]), request["stop_ids"],
                                       emit)
    print(json.dumps({"done": tokens, "stats": stats.to_json(),
                      "first_logits": stats.first_logits}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: loop.py MODEL.so REQUEST.json")
    main(sys.argv[1], sys.argv[2])
