"""Generate tiny random-init reference checkpoints and logits with transformers.

Run in a scratch venv outside the repository (pip install torch transformers safetensors):
    python scripts/make_fixtures.py crates/rlhf-model/tests/fixtures
Writes, per architecture, a HF directory (config.json + model.safetensors) and
`expected.safetensors` with input ids, attention mask, position ids, logits and next-token log-probs.
"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

out = sys.argv[1]
torch.manual_seed(0)
V = 97
specs = {
    "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)),
    "llama": LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                          rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "qwen2": Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                          rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)),
}
for name, model in specs.items():
    model.eval()
    # Random init gives tiny biases/norm weights of exactly 1/0: perturb them so bugs show.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    d = os.path.join(out, name)
    model.save_pretrained(d, safe_serialization=True)
    ids = torch.randint(0, V, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 9:] = 0  # right padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    save_file({"input_ids": ids.to(torch.int64), "attention_mask": mask.to(torch.int64),
               "logits": logits.contiguous(), "logprobs": lp.contiguous()},
              os.path.join(d, "expected.safetensors"))
    print(name, sum(p.numel() for p in model.parameters()), "params")
