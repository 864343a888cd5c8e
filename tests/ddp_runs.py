"""
Several train.py runs inside one torchrun launch, for tests/test_distributed.py: torchrun takes seconds
to start, a tiny run a fraction of one. Each process joins the group once, then runs every argument
list of the JSON file it is given, in order, writing the per-step losses of each to <out_dir>/losses.json
(process 0). train.py sees the group already started and leaves it to this script.

    torchrun --standalone --nproc_per_node=2 tests/ddp_runs.py runs.json
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import train  # noqa: E402

torch.set_num_threads(1)  # two processes on two cores
dist.init_process_group("gloo")
with open(sys.argv[1]) as f:
    runs = json.load(f)
for argv in runs:
    cfg = train.parse_args(argv)
    out_dir = cfg.out_dir
    losses = train.train(cfg)
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "losses.json"), "w") as f:
            json.dump(losses, f)
    dist.barrier()
dist.barrier()
dist.destroy_process_group()
