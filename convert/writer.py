"""Writing: safetensors shards flushed as they fill, and an output folder that appears only when complete."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx


class ConvertError(ValueError):
    """Options or a destination the converter cannot work with."""


class ShardWriter:
    """Collects evaluated tensors and writes `{prefix}-NNNNN.safetensors` whenever `max_bytes` would be
    exceeded (a tensor larger than that gets a shard of its own). `close()` gives the shards their final
    names (`{prefix}.safetensors` when there is one, else `{prefix}-0000i-of-0000n.safetensors`)."""

    def __init__(self, folder: Path, prefix: str, max_bytes: int, metadata: dict):
        self.folder, self.prefix, self.max_bytes, self.metadata = Path(folder), prefix, max_bytes, metadata
        self.buffer: dict[str, mx.array] = {}
        self.buffered = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.tensors = 0

    def add(self, name: str, array: mx.array) -> None:
        mx.eval(array)
        if self.buffer and self.buffered + array.nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = array
        self.buffered += array.nbytes
        self.total_bytes += array.nbytes
        self.tensors += 1

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.folder / f"{self.prefix}-{len(self.shards) + 1:05d}.safetensors"
        mx.save_safetensors(str(path), self.buffer, metadata=self.metadata)
        self.shards.append((path, list(self.buffer)))
        self.buffer, self.buffered = {}, 0
        mx.clear_cache()  # give the freed buffers back, so memory stays at about one shard

    def close(self) -> dict[str, str]:
        """Flush, rename to the final names; the weight map {tensor: file name}."""
        self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, (path, names) in enumerate(self.shards, 1):
            final = f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({k: final for k in names})
        return weight_map
