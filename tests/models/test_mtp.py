"""The MTP layer against an independent, straightforward implementation of REFERENCE §2 written here."""
import math

import pytest
import torch
from safetensors.torch import load_file

from mtpx.loading import build_model, load_checkpoint
from mtpx.loading.checkpoint import count_mtp_layers


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


def reference_mtp_logits(t: dict, cfg: dict, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """Logits for t_{i+2} from pairs (h_i, t_{i+1}): fc(concat(norm_e(embed), norm_h(h))) -> full-attention decoder
    layer (causal over the pairs) -> mtp.norm -> lm_head. Plain loops and matmuls, fp32."""
    H, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    rd = int(hd * cfg["rope_parameters"]["partial_rotary_factor"])
    theta = cfg["rope_parameters"]["rope_theta"]
    emb = t["model.embed_tokens.weight"][next_ids]
    x = torch.cat([rms(emb, t["mtp.pre_fc_norm_embedding.weight"]), rms(hidden, t["mtp.pre_fc_norm_hidden.weight"])], -1)
    x = x @ t["mtp.fc.weight"].T
    p = "mtp.layers.0."
    T = x.shape[0]
    h = rms(x, t[p + "input_layernorm.weight"])
    qg = (h @ t[p + "self_attn.q_proj.weight"].T).view(T, nh, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:].reshape(T, nh * hd)
    k = (h @ t[p + "self_attn.k_proj.weight"].T).view(T, nkv, hd)
    v = (h @ t[p + "self_attn.v_proj.weight"].T).view(T, nkv, hd)
    q, k = rms(q, t[p + "self_attn.q_norm.weight"]), rms(k, t[p + "self_attn.k_norm.weight"])

    def rope(z, pos):
        out = z.clone()
        for j in range(rd // 2):
            ang = pos * theta ** (-2 * j / rd)
            a, b = z[..., j].clone(), z[..., j + rd // 2].clone()
            out[..., j] = a * math.cos(ang) - b * math.sin(ang)
            out[..., j + rd // 2] = b * math.cos(ang) + a * math.sin(ang)
        return out
    q = torch.stack([rope(q[i], i) for i in range(T)])
    k = torch.stack([rope(k[i], i) for i in range(T)])
    attn = torch.zeros(T, nh, hd)
    for i in range(T):
        for head in range(nh):
            kv = head // (nh // nkv)
            s = torch.stack([q[i, head] @ k[j, kv] for j in range(i + 1)]) / math.sqrt(hd)
            attn[i, head] = torch.softmax(s, 0) @ v[: i + 1, kv]
    attn = attn.reshape(T, -1) * torch.sigmoid(gate)
    x = x + attn @ t[p + "self_attn.o_proj.weight"].T
    h = rms(x, t[p + "post_attention_layernorm.weight"])
    if p + "mlp.gate_proj.weight" in t:
        mlp = (torch.nn.functional.silu(h @ t[p + "mlp.gate_proj.weight"].T) * (h @ t[p + "mlp.up_proj.weight"].T))
        x = x + mlp @ t[p + "mlp.down_proj.weight"].T
    else:
        probs = torch.softmax(h @ t[p + "mlp.gate.weight"].T, -1)
        top, idx = probs.topk(cfg["num_experts_per_tok"], -1)
        top = top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for i in range(T):
            for w, e in zip(top[i], idx[i]):
                gu = t[p + "mlp.experts.gate_up_proj"][e] @ h[i]
                g_, u_ = gu.chunk(2)
                out[i] += w * (t[p + "mlp.experts.down_proj"][e] @ (torch.nn.functional.silu(g_) * u_))
            se = t[p + "mlp.shared_expert.down_proj.weight"] @ (
                torch.nn.functional.silu(t[p + "mlp.shared_expert.gate_proj.weight"] @ h[i])
                * (t[p + "mlp.shared_expert.up_proj.weight"] @ h[i]))
            out[i] += torch.sigmoid(t[p + "mlp.shared_expert_gate.weight"] @ h[i]) * se
        x = x + out
    x = rms(x, t["mtp.norm.weight"])
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return x @ head.T


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_mtp_forward_matches_reference(ckpt_factory, moe):
    import json
    path = ckpt_factory(moe=moe)
    tensors = load_file(path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    model = build_model(load_checkpoint(path), torch.float32)
    x = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hidden = model(x)  # post-final-norm hidden states of the main model
        ours = model.logits(model.mtp_forward(hidden[:, :-1], x[:, 1:]))[0]
        ref = reference_mtp_logits(tensors, cfg, hidden[0, :-1], x[0, 1:])
        assert (ours - ref).abs().max() < 1e-4
        # with its own KV cache: prefill 6 pairs, then one pair at a time
        state = model.new_mtp_state(32)
        parts = [model.mtp_forward(hidden[:, :6], x[:, 1:7], [state], "prefill")]
        for i in range(6, 11):
            parts.append(model.mtp_forward(hidden[:, i:i + 1], x[:, i + 1:i + 2], [state], "step"))
        cached = model.logits(torch.cat(parts, 1))[0]
        assert (cached - ref).abs().max() < 1e-4


def test_mtp_layer_count_inferred_from_weights(dense_ckpt):
    ckpt = load_checkpoint(dense_ckpt)
    assert ckpt.config.mtp_num_hidden_layers is None  # config omits it, as Qwen3.6's does
    assert count_mtp_layers(ckpt.shapes) == 1
    assert build_model(ckpt, torch.float32).mtp is not None


@pytest.mark.parametrize("dtype,draft_vocab,penalized", [("bf16", 0, False), ("bf16", 100, False), ("int8", 0, False),
                                                         ("int4", 100, False), ("bf16", 0, True), ("int8", 100, True)])
def test_greedy_draft_chain_in_one_call_equals_step_by_step_drafting(dense_ckpt, dtype, draft_vocab, penalized):
    """The CPU runner's mtp_greedy_drafts (one kernel call for k drafts) proposes what the step-by-step drafting loop
    proposes, penalties included (each draft penalised for the history and the drafts before it), and leaves the MTP
    cache as that loop does."""
    from mtpx import kernels
    from mtpx.llm import LLM
    from mtpx.sampling import SamplingParams, apply_penalties, penalty_history
    if not kernels.rowgemm_available():
        pytest.skip("the CPU kernels could not be built here")
    llm = LLM(dense_ckpt, dtype=dtype)
    model, head = llm.model, llm._draft_head(draft_vocab)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 24), generator=g)
    history, n_prompt = ids[0, :21].tolist(), 8
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5 if penalized else 1.0,
                            frequency_penalty=0.4 if penalized else 0.0, presence_penalty=0.3 if penalized else 0.0)
    penalty = None
    if penalized:
        penalty = (*penalty_history(history, n_prompt, model.cfg.vocab_size, "cpu"), params.repetition_penalty,
                   params.frequency_penalty, params.presence_penalty)
    with torch.inference_mode():
        state = model.new_state(64)
        hidden = model(ids[:, :20], [state], "prefill")[0]
        for n, k in ((1, 1), (3, 4), (5, 2)):
            pairs_h, pairs_t = hidden[-n:], ids[0, 20 - n + 1:21]
            mtp_a, mtp_b = model.new_mtp_state(64), model.new_mtp_state(64)
            for s in (mtp_a, mtp_b):  # the same history in both caches
                model.mtp_forward(hidden[None, :12], ids[:, 1:13], [s], "prefill")
            chain = model.mtp_greedy_drafts(pairs_h, pairs_t, mtp_a, k, head, penalty)
            assert chain is not None
            x = model.mtp_forward(pairs_h[None], pairs_t[None], [mtp_b], "step")[0, -1:]
            steps = []
            for j in range(k):
                logits = head(x) if head is not None else model.logits(x, step=True)
                logits = apply_penalties(logits.float(), params, history + steps, n_prompt)
                steps.append(int(logits.argmax(-1)))
                if j + 1 < k:
                    x = model.mtp_forward(x[None], torch.tensor([[steps[-1]]]), [mtp_b], "step")[0]
            assert chain == steps
            assert mtp_a.length == mtp_b.length == 12 + n + k - 1
            length = mtp_a.length
            assert torch.equal(mtp_a.kv[0][0][:, :length], mtp_b.kv[0][0][:, :length])
