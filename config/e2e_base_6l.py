# The stand-in base of the README's method comparison (compare.py --seeds): real GPT-2 weights cannot be
# had on this project's machines, so a GPT-2 of 6 layers, 192 wide, is pretrained from scratch on the E2E
# reference sentences alone (data/e2e_refs: train references to train on, dev references to validate;
# never an MR, never the test set), so an adapter on it still has the whole data-to-text task to learn.
# About 2 epochs of the 1,017,236 training tokens, ~25 minutes on 2 CPU cores (README, Comparing the methods):
#   python data/e2e_refs/prepare.py
#   python train.py config/e2e_base_6l.py
# The smaller config/e2e_base.py (4 layers, 128 wide, ~8 minutes) is the one `make demo` uses.
init_from = "scratch"
dataset = "e2e_refs"
out_dir = "out-e2e-base-6l"
adapter = "none"
n_layer = 6
n_head = 6
n_embd = 192
block_size = 192  # E2E examples are up to 142 tokens, and decoding adds up to 64 to a prompt
batch_size = 12  # 2,304 tokens a step
max_iters = 900  # 2,073,600 tokens
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
