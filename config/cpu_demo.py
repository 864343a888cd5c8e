# The CPU demo, step 1 of 2: a small GPT-2 from scratch on Shakespeare, no pretrained weights, no network.
#   python data/shakespeare/prepare.py
#   python train.py config/cpu_demo.py
# It writes out-cpu-demo/ (config.json + model.safetensors, the Hugging Face layout), which step 2
# (config/cpu_demo_e2e.py) loads as its base. Measured losses and times: see the README.
init_from = "scratch"
dataset = "shakespeare"
out_dir = "out-cpu-demo"
adapter = "none"  # train the whole model
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
batch_size = 16
max_iters = 500
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
decay = "cosine"
weight_decay = 0.1
beta2 = 0.99
eval_interval = 100
eval_iters = 20
eval_prompt = "ROMEO:"
device = "cpu"
