"""
Batches from what data/<name>/prepare.py wrote, for train.py.

Every batch is a pure function of (split, index, seed): batch i of a stream is drawn from a generator
seeded with (seed, i); batch i of an example set comes from the epoch-by-epoch shuffled order. Resuming
at step N therefore needs no data-loader state to continue exactly where the run stopped.

Length grouping (group_by_length, the default for example sets). A batch is padded to its longest
example, and every padded position costs a full forward and backward. E2E's examples run from 14 to 142
tokens: random batches of 8 are 26.5% padding, of 32 33.6%. So each epoch's shuffled order is cut into
windows of GROUP_WINDOW batches, each window is sorted by length and cut into batches, and the batches of
the whole epoch are shuffled again: neighbours in a batch have nearly the same length (0.4-0.8% padding
on E2E train at batch 8 to 32), while what a batch holds and the order of the batches stay random. Each
epoch is ceil(n / batch_size) batches and shows every example exactly once (one batch is smaller when
the batch size does not divide n). Only the training split is grouped: validation batches stay
random, so that a few of them estimate the loss over all lengths, and runs with and without grouping
are measured on the same batches. Packing several examples into one row with a block-diagonal mask
would waste nothing at all, but needs a mask in the attention, which the padded batches do not.
"""
import os

import torch

from data.common import prepare_command, read_meta

EOT = 50256
GROUP_WINDOW = 100  # batches sorted together: larger windows pad less but make batches less random


class Batches:

    def __init__(self, data_dir, batch_size, block_size, seed=0, group_by_length=True):
        how = prepare_command(data_dir)
        self.redo = f"run {how} again"
        if not os.path.exists(os.path.join(data_dir, "meta.json")):  # (a FileNotFoundError, as for the .bin files)
            raise FileNotFoundError(f"no prepared data in {data_dir}: run {how} first")
        self.meta = read_meta(data_dir, f"run {how}")
        self.data_dir, self.kind = data_dir, self.meta["kind"]  # Shakespeare is a stream, E2E is examples
        self.batch_size, self.seed, self.group_by_length = batch_size, seed, group_by_length
        self.tokens, self.examples, self.orders, self.groups = {}, {}, {}, {}
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
                if len(rows) < batch_size:  # validation batches are whole batches: none would fit
                    raise ValueError(f"the {split} split of {data_dir} has {len(rows)} examples, fewer than "
                                     f"batch_size {batch_size}: give a batch_size of at most {len(rows)}")
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
        index = self.examples[split]
        picks = [index[k].tolist() for k in self.batch_examples(split, i)]
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

    def batch_examples(self, split, i):
        """The example numbers in batch i."""
        n, B = len(self.examples[split]), self.batch_size
        if not self.group_by_length or split != "train":  # validation: random batches, comparable across runs
            # position (i*B + b) of an endless sequence of epochs, each its own seeded shuffle
            return [self._order(split, k // n)[k % n] for k in range(i * B, (i + 1) * B)]
        epoch, j = divmod(i, -(-n // B))  # ceil(n / B) batches an epoch
        return self._grouped(split, epoch)[j]

    def _grouped(self, split, epoch):
        """An epoch's batches, length-grouped (see the top of this file)."""
        if (split, epoch) not in self.groups:
            if len(self.groups) > 4:
                self.groups.clear()
            order, B = self._order(split, epoch), self.batch_size
            length = self.examples[split][:, 2].tolist()
            window = GROUP_WINDOW * B
            batches = []
            for w in range(0, len(order), window):
                ranked = sorted(order[w:w + window], key=length.__getitem__)  # stable: ties keep the shuffle
                batches += [ranked[b:b + B] for b in range(0, len(ranked), B)]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 500_000_003)  # not _order's stream
            self.groups[split, epoch] = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        return self.groups[split, epoch]

    def positions(self, split, i):
        """-> (used, padded): the real positions of batch i and the positions it is padded to (its rows
        times its longest row), from the examples' lengths alone, nothing read."""
        rows = self.examples[split][self.batch_examples(split, i), 2].clamp(max=self.block_size + 1) - 1
        return int(rows.sum()), len(rows) * int(rows.max())

    def padding_share(self, split="train", batches=None):
        """The share of a batch's positions that are padding, over an epoch's batches (or the first
        `batches`)."""
        count = self._steps(split)
        used, padded = map(sum, zip(*(self.positions(split, i) for i in range(count if batches is None else min(batches, count)))))
        return 1 - used / padded

    def _order(self, split, epoch):
        if (split, epoch) not in self.orders:
            if len(self.orders) > 4:
                self.orders.clear()  # a batch spans at most two epochs: keep only recent orders
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.orders[split, epoch] = torch.randperm(len(self.examples[split]), generator=g).tolist()
        return self.orders[split, epoch]

    def epoch_steps(self):
        """Batches per epoch of the training split (None for a stream: it has no epochs)."""
        return None if self.kind == "stream" else self._steps("train")

    def _steps(self, split):
        """Batches an epoch of an example split: every example once (ceil) when grouped, whole batches otherwise."""
        n = len(self.examples[split])
        return -(-n // self.batch_size) if self.group_by_length and split == "train" else n // self.batch_size
