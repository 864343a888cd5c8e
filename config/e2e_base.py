# A stand-in base for compare.py where real GPT-2 weights cannot be had: a small GPT-2 pretrained from
# scratch on the E2E reference sentences alone (data/e2e_refs: the domain's English, never an MR), so
# that the adapters still have the whole data-to-text task to learn. A few minutes on 2 CPU cores:
#   python data/e2e_refs/prepare.py
#   python train.py config/e2e_base.py
#   python tools/compare.py --init_from=out-e2e-base --max_iters=300 --eval_mrs=100
init_from = "scratch"
dataset = "e2e_refs"
out_dir = "out-e2e-base"
adapter = "none"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 192  # E2E examples are up to 142 tokens, and decoding adds up to 64 to a prompt
batch_size = 12  # 2,304 tokens a step
max_iters = 600
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 50
decay = "cosine"
weight_decay = 0.1
beta2 = 0.99
eval_interval = 150
eval_iters = 20
eval_prompt = " The Eagle"
device = "cpu"
