# LoRA on E2E NLG with GPT-2 Medium: the recipe of the LoRA paper (Hu et al. 2021, Table 11), which
# ShareLoRA's GPT-2 experiments follow. Needs the real weights (network or a local copy) and a GPU:
#   python data/e2e/prepare.py
#   python train.py config/e2e_gpt2m_lora.py
# trainable: 393,216 parameters (docs/METHOD.md: 24 layers x r 4 x (1024 + 1024) x 2 targets)
init_from = "gpt2-medium"
dataset = "e2e"
out_dir = "out-e2e-gpt2m-lora"
adapter = "lora"
targets = "q,v"
r = 4
alpha = 32.0
adapter_dropout = 0.1
learning_rate = 2e-4
weight_decay = 0.01
batch_size = 8
# 5 epochs: the train split has 42,061 examples, 5,257 batches of 8 an epoch
max_iters = 26288
warmup_iters = 500
decay = "linear"
label_smoothing = 0.1
eval_interval = 2000
eval_iters = 50  # 400 of the dev set's 4,672 examples, the same ones at every eval
eval_prompt = "name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5], near[Café Adriatic] ||"
