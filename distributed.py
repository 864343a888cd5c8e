"""
Data-parallel training for train.py: torchrun starts N processes (on one machine or several), each
holds the whole model on its own device and takes its share of every batch; DistributedDataParallel
(DDP) averages the gradients across them after each backward pass.

    torchrun --standalone --nproc_per_node=4 train.py config/e2e_gpt2m_sharea.py

What N changes is speed; what it does not change is the run. batch_size and grad_accum keep their
meaning as the global batch of one optimizer step: every process reads the same global micro-batch (a
pure function of (split, index, seed), see data/loader.py) and keeps its own rows, rows
[rank * B/N, (rank + 1) * B/N). The loss of a micro-batch is the mean over all its supervised tokens,
whatever process holds them: E2E rows have different numbers of reference tokens, so a mean of the
per-process means would weigh a short reference's tokens more. Each process scales its own mean by
(its tokens / the micro-batch's tokens) * N, and DDP's average of the N gradients then is exactly the
one-process gradient. Every process knows the micro-batch's token count, having read the whole batch:
no communication is needed for the weights. Between two steps one small all-reduce carries the stop
flag (Ctrl-C) and, every log_interval steps, the losses; the validation loss takes one per evaluation,
and every process's random state travels to process 0 at each checkpoint.

A shared tensor (ShareA's A, Tied-LoRA's A and B) is one nn.Parameter of the model, so DDP all-reduces
it once, however many layers use it. Gradient accumulation skips DDP's all-reduce on all but the last
micro-batch (no_sync): the gradients add up locally and are reduced once per step.

Each process draws its dropout masks from its own generator (seed + rank), which every checkpoint
saves per process and a resume restores per process: a resumed run with the same N is the
uninterrupted one. Dropout draws different masks when the rows are split differently, so with
dropout > 0 runs with different N are equally good but not identical; with dropout 0 they agree to
float rounding.
"""
import contextlib
import os

import torch
import torch.distributed as dist

from data.common import check, fail


class Single:
    """The ordinary one-process run: every method is a no-op."""
    rank, world, main = 0, 1, True

    def start(self):
        pass

    def check_batch(self, batch_size):
        pass

    def device(self, device):
        return device

    def shard(self, x, y):
        return x, y

    def wrap(self, model):
        return model

    def no_sync(self, last):
        return contextlib.nullcontext()

    def sum(self, values):
        return list(values)

    def gather(self, obj):
        return [obj]

    def barrier(self):
        pass

    def finish(self):
        pass


class Group(Single):
    """One process of a torchrun job (the environment torchrun sets: RANK, LOCAL_RANK, WORLD_SIZE)."""

    def __init__(self):
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.main = self.rank == 0
        self.started, self.ddp = False, None

    def start(self):
        """Join the process group before anything is read, so that process 0 can go first where files may
        change. Collectives on CPU tensors go through gloo, on CUDA tensors through NCCL (when this torch
        has CUDA): the device is only known once the options are (a resumed run's come from its checkpoint)."""
        if dist.is_initialized():  # started by the caller (tests run several trainings in one group)
            return
        cuda = torch.cuda.is_available() and dist.is_nccl_available()
        if cuda and self.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
        self.started = True

    def check_batch(self, batch_size):
        check(batch_size % self.world == 0,
              f"batch_size {batch_size} does not split among {self.world} processes: give a batch_size that "
              f"{self.world} divides (it is the global batch, the same whatever the number of processes)")

    def device(self, device):
        """Each process on its own GPU (LOCAL_RANK), or all on the CPU."""
        if not device.startswith("cuda"):
            return device
        count = torch.cuda.device_count()
        check(self.local_rank < count, f"torchrun started process {self.local_rank} on this machine, which has "
                                       f"{count} CUDA GPU(s): give --nproc_per_node={count} or fewer")
        return f"cuda:{self.local_rank}"

    def shard(self, x, y):
        n = x.size(0) // self.world
        return x[self.rank * n:(self.rank + 1) * n], y[self.rank * n:(self.rank + 1) * n]

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel
        device = next(p for p in model.parameters() if p.requires_grad).device
        # a joint run (bank.py) trains one task's B per step: the other tasks' get no gradient, which DDP
        # must be told to expect
        joint = hasattr(model, "bank_tensors")
        self.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                           find_unused_parameters=joint)
        return self.ddp

    def no_sync(self, last):
        """Skip the gradient all-reduce on every micro-batch but the last one of a step."""
        return contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()

    def sum(self, values):
        """Sum a few floats across the processes (float64, on the CPU: gloo carries it)."""
        t = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        """Every process's `obj` (small, picklable), in the order of the ranks, in every process."""
        out = [None] * self.world
        dist.all_gather_object(out, obj)  # through gloo: the objects are in CPU memory
        return out

    def barrier(self):
        dist.barrier()

    def finish(self):
        """Leave the group. The barrier first: torch 2.13's gloo can abort at exit when one process
        destroys the group while another still uses it."""
        if self.started and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def setup():
    """Single() for `python train.py`, a Group for each process torchrun starts."""
    if "LOCAL_RANK" not in os.environ:
        return Single()
    for name in ("RANK", "WORLD_SIZE"):
        if name not in os.environ:
            fail(f"LOCAL_RANK is set but {name} is not: start train.py with torchrun, or unset LOCAL_RANK")
    return Group()
