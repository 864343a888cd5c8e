# VeRA on E2E NLG with GPT-2 Medium. VeRA trains only the scaling vectors, so it needs a much larger
# rank and learning rate than LoRA: the VeRA paper (Kopiczko et al. 2024, Table 9) uses r = 1024 and
# lr 1e-2 for its E2E runs (with r = 1024 the frozen random A and B cost memory, not parameters).
#   python train.py config/e2e_gpt2m_vera.py
# trainable: 24 layers x (1024 + 1024) x 2 targets = 98,304 parameters
import os
exec(open(os.path.join(os.path.dirname(__file__), "e2e_gpt2m_lora.py")).read())
adapter = "vera"
r = 1024
learning_rate = 1e-2
out_dir = "out-e2e-gpt2m-vera"
