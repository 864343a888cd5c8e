# The CPU demo, step 2 of 2: a ShareA adapter on E2E NLG, on top of the small model of step 1.
#   python data/e2e/prepare.py
#   python train.py config/cpu_demo_e2e.py
#   python sample.py --out_dir=out-cpu-demo-e2e --start="name[The Eagle], eatType[coffee shop], food[French]"
# The base knows Shakespeare's English, not restaurants, so expect its sentences to be rough.
init_from = "out-cpu-demo"
dataset = "e2e"
out_dir = "out-cpu-demo-e2e"
adapter = "sharea"
targets = "q,v,attn.c_proj,mlp.c_fc,mlp.c_proj"
r = 8
alpha = 16.0
batch_size = 16
max_iters = 800
learning_rate = 3e-3
warmup_iters = 50
decay = "linear"
weight_decay = 0.01
eval_interval = 200
eval_iters = 20
eval_prompt = "name[The Eagle], eatType[coffee shop], food[French] ||"
device = "cpu"
