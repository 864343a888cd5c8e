"""
Batches from what data/<name>/prepare.py wrote, for train.py.

Every batch is a pure function of (split, index): batch i of a stream is drawn from a generator seeded
with (seed, i), batch i of an example set is slice i of the epoch-by-epoch shuffled order. Resuming at
step N therefore needs no data-loader state to continue exactly where the run stopped.
"""
import json
import os

import torch

EOT = 50256


class Batches:

    def __init__(self, data_dir, batch_size, block_size, seed=0):
        meta_path = os.path.join(data_dir, "meta.json")
        name = os.path.basename(os.path.normpath(data_dir))
        self.redo = f"run python data/{name}/prepare.py again"
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"no prepared data in {data_dir}: run python data/{name}/prepare.py first")
        try:
            with open(meta_path, encoding="utf-8") as f:
                self.meta = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_path} is not valid JSON ({e}): {self.redo}") from None
        self.data_dir = data_dir
        self.kind = self.meta.get("kind") if isinstance(self.meta, dict) else None
        if self.kind not in ("stream", "examples"):  # Shakespeare is a stream, E2E is examples
            raise ValueError(f"{meta_path} has no valid kind (stream or examples): {self.redo}")
        self.batch_size, self.seed = batch_size, seed
        self.tokens, self.examples, self.orders = {}, {}, {}
        for split in ("train", "val"):
            self.tokens[split] = self._read(os.path.join(data_dir, f"{split}.bin"), torch.uint16)
            if self.kind == "examples":  # rows of (start, context_len, total_len)
                path = os.path.join(data_dir, f"{split}_examples.bin")
                rows = self._read(path, torch.int32).view(-1, 3)
                n = len(self.tokens[split])
                bad = (rows[:, 0] < 0) | (rows[:, 1] < 1) | (rows[:, 2] <= rows[:, 1]) | (rows[:, 0] + rows[:, 2] > n)
                if len(rows) == 0 or bad.any():
                    raise ValueError(f"{path} does not fit {split}.bin (empty, truncated or from another "
                                     f"preparation): {self.redo}")
                self.examples[split] = rows
        self.set_block_size(block_size)

    def max_token(self):
        """The largest token id in the data: it must be inside the model's vocabulary."""
        return max(int(t.max()) for t in self.tokens.values())

    def set_block_size(self, block_size):
        """A stream draws windows of block_size + 1 tokens: each split must hold at least one."""
        if self.kind == "stream":
            for split, data in self.tokens.items():
                if len(data) < block_size + 2:
                    raise ValueError(f"the {split} split has {len(data)} tokens, too few for block_size "
                                     f"{block_size}: lower block_size below {max(1, len(data) - 2)}, or prepare more text")
        self.block_size = block_size

    def _read(self, path, dtype):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: {self.redo}")
        with open(path, "rb") as f:
            raw = bytearray(f.read())
        size = torch.tensor([], dtype=dtype).element_size() * (3 if dtype == torch.int32 else 1)
        if len(raw) == 0 or len(raw) % size:
            raise ValueError(f"{path} is {'empty' if not raw else 'truncated'} ({len(raw)} bytes): {self.redo}")
        return torch.frombuffer(raw, dtype=dtype).to(torch.long)

    def get(self, split, i):
        """-> (x, y), int64 (B, T): y is x shifted by one, -100 where the loss does not count."""
        if self.kind == "stream":
            data = self.tokens[split]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            starts = torch.randint(len(data) - self.block_size - 1, (self.batch_size,), generator=g)
            rows = torch.stack([data[s:s + self.block_size + 1] for s in starts.tolist()])
            return rows[:, :-1], rows[:, 1:]
        return self._example_batch(split, i)

    def _example_batch(self, split, i):
        # Example b of batch i is position (i*B + b) of an endless sequence of epochs, each its own
        # seeded shuffle. E2E train has 42,061 examples: batch 8 makes 5,258 steps an epoch.
        index = self.examples[split]
        n = len(index)
        picks = []
        for k in range(i * self.batch_size, (i + 1) * self.batch_size):
            epoch, pos = divmod(k, n)
            order = self._order(split, epoch)
            picks.append(index[order[pos]].tolist())
        T = min(self.block_size + 1, max(total for _, _, total in picks))  # pad to the longest, not to block_size
        x = torch.full((len(picks), T - 1), EOT, dtype=torch.long)
        y = torch.full((len(picks), T - 1), -100, dtype=torch.long)
        for b, (start, context, total) in enumerate(picks):
            cut = max(0, total - T)  # too long for the context: drop the MR's start, keep the reference
            seq = self.tokens[split][start + cut:start + total]
            x[b, :len(seq) - 1] = seq[:-1]
            y[b, :len(seq) - 1] = seq[1:]
            y[b, :max(0, context - cut - 1)] = -100  # the MR is context: the loss counts the reference only
        return x, y

    def _order(self, split, epoch):
        if (split, epoch) not in self.orders:
            if len(self.orders) > 4:
                self.orders.clear()  # a batch spans at most two epochs: keep only recent orders
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.orders[split, epoch] = torch.randperm(len(self.examples[split]), generator=g).tolist()
        return self.orders[split, epoch]

    def epoch_steps(self):
        """Batches per epoch of the training split (None for a stream: it has no epochs)."""
        return None if self.kind == "stream" else len(self.examples["train"]) // self.batch_size
