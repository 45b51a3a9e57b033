"""Tiny random checkpoints in the real Hugging Face layout, built with transformers (a test-only dependency)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3's chat template, shortened (the test models' context is 512 tokens): tools in the system turn, <tool_call>{json}</tool_call> for calls, tool results as
# <tool_response> in a user turn, think blocks (enable_thinking false closes an empty one in the generation prompt)
QWEN_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content + '\n\n' }}"
    "{% endif %}<tools>{% for tool in tools %}\n{{ tool.function | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role in ('user', 'system') %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- elif message.role == 'assistant' %}<|im_start|>assistant\n{% if message.reasoning_content %}<think>\n"
    "{{ message.reasoning_content }}\n</think>\n\n{% endif %}{{ message.content }}"
    "{% for tc in message.tool_calls or [] %}\n<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": "
    "{{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "def add(a, b):\n    return a + b\n", "import os\nimport sys\n\nprint(os.getcwd())\n",
    "The quick brown fox jumps over the lazy dog. " * 3, "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Hello, how are you today? I am fine, thank you.", "while True:\n    break\n",
]


def base_config(moe: bool = False, tied: bool = False, vocab: int = 384, intermediate: int = 96) -> dict:
    cfg = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12,
        linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        eos_token_id=2, bos_token_id=None,
    )
    if moe:
        cfg.update(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
    return cfg


def make_tokenizer(out: Path, vocab: int = 320, template: str = "plain") -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": QWEN_TEMPLATE if template == "qwen" else CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None,
         "tokenizer_class": "PreTrainedTokenizerFast"}))


def make_checkpoint(out: Path, moe: bool = False, tied: bool = False, nested: bool = False, mtp: bool = True,
                    seed: int = 0, per_expert: bool = False, intermediate: int = 96, template: str = "plain") -> Path:
    """Save a transformers Qwen3.5 model (random weights), add `mtp.*` tensors (transformers drops them), and
    optionally rewrite it into the nested multimodal layout (model_type qwen3_5, weights under model.language_model)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig, Qwen3_5TextConfig
    torch.manual_seed(seed)
    cfg_dict = base_config(moe, tied, intermediate=intermediate)
    hf_cfg = (Qwen3_5MoeTextConfig if moe else Qwen3_5TextConfig)(**cfg_dict)
    model = (Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM)(hf_cfg).float().eval()
    with torch.no_grad():  # zero-initialised norms would hide (1 + w) mistakes
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tensors = load_file(out / "model.safetensors")
    if mtp:
        g = torch.Generator().manual_seed(seed + 1)
        mtp_model = (Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM)(
            (Qwen3_5MoeTextConfig if moe else Qwen3_5TextConfig)(**{**cfg_dict, "num_hidden_layers": 1,
                                                                  "layer_types": ["full_attention"]}))
        layer = {k[len("model.layers.0."):]: v for k, v in mtp_model.state_dict().items() if k.startswith("model.layers.0.")}
        h = cfg_dict["hidden_size"]
        tensors["mtp.fc.weight"] = torch.randn(h, 2 * h, generator=g) * 0.08
        for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            tensors[f"mtp.{n}.weight"] = torch.randn(h, generator=g) * 0.2
        for k, v in layer.items():
            tensors[f"mtp.layers.0.{k}"] = v.clone() + (torch.randn(v.shape, generator=g) * 0.1 if k.endswith("norm.weight") else 0)
    if per_expert:
        for k in [k for k in tensors if k.endswith("mlp.experts.gate_up_proj")]:
            gu, down = tensors.pop(k), tensors.pop(k.replace("gate_up_proj", "down_proj"))
            base, inter = k[: -len(".gate_up_proj")], gu.shape[1] // 2
            for e in range(gu.shape[0]):
                tensors[f"{base}.{e}.gate_proj.weight"] = gu[e, :inter].clone()
                tensors[f"{base}.{e}.up_proj.weight"] = gu[e, inter:].clone()
                tensors[f"{base}.{e}.down_proj.weight"] = down[e].clone()
    config = json.loads((out / "config.json").read_text())
    if nested:
        tensors = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
                   for k, v in tensors.items()}
        tensors["model.visual.patch_embed.proj.weight"] = torch.zeros(4, 3)  # a vision tower the loader must skip
        text = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "dtype")}
        config = {"model_type": "qwen3_5_moe" if moe else "qwen3_5", "text_config": text, "tie_word_embeddings": tied,
                  "architectures": ["Qwen3_5ForConditionalGeneration"]}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    make_tokenizer(out, template=template)  # "qwen": QWEN_TEMPLATE, with tools and think blocks
    return out


def hf_model(path: Path, moe: bool = False):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM
    return (Qwen3_5MoeForCausalLM if moe else Qwen3_5ForCausalLM).from_pretrained(path, dtype=torch.float32).eval()


# ---------------------------------------------------------------- GLM-4.5 (glm4_moe), MTP as an extra decoder layer

def glm_config(tied: bool = False, n_layers: int = 3) -> dict:
    return dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
                num_experts_per_tok=2, n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1,
                first_k_dense_replace=1, use_qk_norm=True, attention_bias=True, routed_scaling_factor=2.5,
                norm_topk_prob=True, num_nextn_predict_layers=1, max_position_embeddings=512, rms_norm_eps=1e-5,
                tie_word_embeddings=tied, eos_token_id=2, initializer_range=0.05,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})


def _perturb(model, g: torch.Generator) -> None:
    """Norms away from 1 and router biases away from 0: their defaults would hide mistakes."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def nextn_tensors(layer: dict, h: int, prefix: str, g: torch.Generator) -> dict:
    """An MTP ("nextn") layer in the GLM-4.5 / DeepSeek-V3 on-disk names: a decoder layer's tensors (`layer`, names
    after `model.layers.N.`) plus enorm, hnorm, eh_proj, shared_head.norm, under `prefix` (model.layers.{L}.)."""
    out = {prefix + k: v.clone() for k, v in layer.items()}
    out[prefix + "eh_proj.weight"] = torch.randn(h, 2 * h, generator=g) * 0.08
    for n in ("enorm", "hnorm", "shared_head.norm"):
        out[f"{prefix}{n}.weight"] = 1 + torch.randn(h, generator=g) * 0.2
    return out


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.7, "mscale_all_dim": 0.7}


def deepseek_config(tied: bool = False, n_layers: int = 3, q_lora: bool = True, interleave: bool = True,
                    yarn: bool = False) -> dict:
    return dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers,
                num_attention_heads=4, q_lora_rank=48 if q_lora else None, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=12, moe_intermediate_size=32, num_experts_per_tok=2,
                n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
                routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=1,
                max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=tied, eos_token_id=2,
                bos_token_id=None, initializer_range=0.05, rope_interleave=interleave,
                rope_parameters=dict(YARN) if yarn else {"rope_type": "default", "rope_theta": 10000.0})


def _routed_classes(family: str):
    import transformers
    name = {"glm": "Glm4Moe", "deepseek": "DeepseekV3", "glm_lite": "Glm4MoeLite"}[family]
    return getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")


def make_glm_checkpoint(out: Path, mtp: bool = True, seed: int = 0, tied: bool = False,
                        mtp_copies: bool = False) -> Path:
    return make_routed_checkpoint(out, glm_config(tied), "glm", mtp, seed, mtp_copies)


def make_deepseek_checkpoint(out: Path, mtp: bool = True, seed: int = 0, tied: bool = False,
                             mtp_copies: bool = True, q_lora: bool = True, interleave: bool = True,
                             yarn: bool = False) -> Path:
    cfg = deepseek_config(tied, q_lora=q_lora, interleave=interleave, yarn=yarn)
    return make_routed_checkpoint(out, cfg, "deepseek", mtp, seed, mtp_copies)


def make_glm_lite_checkpoint(out: Path, mtp: bool = True, seed: int = 0) -> Path:
    """GLM-4.7-Flash's layout (glm4_moe_lite): DeepSeek-V3's MLA, dense layers named by mlp_layer_types."""
    cfg = {k: v for k, v in deepseek_config().items() if k != "first_k_dense_replace"}
    cfg.update(mlp_layer_types=["dense", "sparse", "sparse"], n_group=1, topk_group=1)
    return make_routed_checkpoint(out, cfg, "glm_lite", mtp, seed, mtp_copies=False)


def make_routed_checkpoint(out: Path, cfg: dict, family: str, mtp: bool = True, seed: int = 0,
                           mtp_copies: bool = False) -> Path:
    """A transformers Glm4MoeForCausalLM / DeepseekV3ForCausalLM (random weights, per-expert tensors as the real
    checkpoints store them) plus its MTP layer as `model.layers.{L}.*` (transformers drops it); `mtp_copies`: with
    copies of the embedding and output head under it, as DeepSeek-V3 stores them."""
    Config, ForCausalLM = _routed_classes(family)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = ForCausalLM(Config(**cfg)).float().eval()
    _perturb(model, g)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tensors = load_file(out / "model.safetensors")
    if mtp:
        L = cfg["num_hidden_layers"]
        more = {"num_hidden_layers": L + 1}
        if "mlp_layer_types" in cfg:
            more["mlp_layer_types"] = cfg["mlp_layer_types"] + ["sparse"]
        bigger = ForCausalLM(Config(**{**cfg, **more})).float()
        _perturb(bigger, g)
        bigger.save_pretrained(out / "tmp", safe_serialization=True)
        layer = {k[len(f"model.layers.{L}."):]: v for k, v in load_file(out / "tmp" / "model.safetensors").items()
                 if k.startswith(f"model.layers.{L}.")}
        for f in (out / "tmp").iterdir():
            f.unlink()
        (out / "tmp").rmdir()
        tensors.update(nextn_tensors(layer, cfg["hidden_size"], f"model.layers.{L}.", g))
        if mtp_copies:
            tensors[f"model.layers.{L}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
            head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
            tensors[f"model.layers.{L}.shared_head.head.weight"] = head.clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    make_tokenizer(out)
    return out


def hf_routed_model(path: Path, family: str = "glm"):
    return _routed_classes(family)[1].from_pretrained(path, dtype=torch.float32).eval()


def hf_glm_model(path: Path):
    return hf_routed_model(path, "glm")


# ---------------------------------------------------------------- Qwen3-Next (fused qkvz / ba projections, mtp.*)

def make_qwen3_next_checkpoint(out: Path, mtp: bool = True, seed: int = 0) -> Path:
    """A transformers Qwen3NextForCausalLM (random weights) plus `mtp.*` tensors (transformers drops them)."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    cfg = base_config(moe=True)
    model = Qwen3NextForCausalLM(Qwen3NextConfig(**cfg)).float().eval()
    _perturb(model, g)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tensors = load_file(out / "model.safetensors")
    if mtp:
        one = Qwen3NextForCausalLM(Qwen3NextConfig(**{**cfg, "num_hidden_layers": 1,
                                                       "layer_types": ["full_attention"]})).float()
        _perturb(one, g)
        h = cfg["hidden_size"]
        one.save_pretrained(out / "tmp", safe_serialization=True)  # experts one module each, as Qwen3-Next's mtp.*
        for k, v in load_file(out / "tmp" / "model.safetensors").items():
            if k.startswith("model.layers.0."):
                tensors["mtp.layers.0." + k[len("model.layers.0."):]] = v.clone()
        for f in (out / "tmp").iterdir():
            f.unlink()
        (out / "tmp").rmdir()
        tensors["mtp.fc.weight"] = torch.randn(h, 2 * h, generator=g) * 0.08
        for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            tensors[f"mtp.{n}.weight"] = torch.randn(h, generator=g) * 0.2
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    make_tokenizer(out)
    return out


def hf_qwen3_next_model(path: Path):
    from transformers import Qwen3NextForCausalLM
    return Qwen3NextForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
