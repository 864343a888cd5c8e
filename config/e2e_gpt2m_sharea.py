# ShareA on E2E NLG with GPT-2 Medium: the official ShareLoRA GPT-2 setting. Everything as in the LoRA
# recipe, except that each target's A is one matrix shared by all 24 layers:
#   python train.py config/e2e_gpt2m_sharea.py
# trainable: 204,800 parameters, 52% of LoRA's 393,216 (docs/METHOD.md:
# r·d_in + L·r·d_out per target).
# The other presets are one override away, e.g.
#   python train.py config/e2e_gpt2m_sharea.py --adapter=shareb  --out_dir=out-e2e-gpt2m-shareb   # 204,800
#   python train.py config/e2e_gpt2m_sharea.py --adapter=shareab --out_dir=out-e2e-gpt2m-shareab  # 16,384
#   python train.py config/e2e_gpt2m_sharea.py --adapter=tied    --out_dir=out-e2e-gpt2m-tied     # 65,728
#   python train.py config/e2e_gpt2m_vera.py                                                      # see there
import os
exec(open(os.path.join(os.path.dirname(__file__), "e2e_gpt2m_lora.py")).read())
adapter = "sharea"
out_dir = "out-e2e-gpt2m-sharea"
