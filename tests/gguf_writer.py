"""Write a tiny GGUF file from a transformers Qwen2 / Qwen3 model, as llama.cpp's converter lays one out
(hyper-parameters under the architecture's keys, llama.cpp tensor names, a byte-level BPE vocabulary with
its merges and control tokens), so ``cascade convert`` can be tested on a real file without a download."""

from __future__ import annotations

from pathlib import Path

# 64 tokens: printable characters in GPT-2's byte alphabet (Ġ is the space, Ċ the newline), one merge, and
# the ChatML control tokens
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;()=+-*_") + ["Ġ", "Ċ"]
TOKENS = CHARS + ["ab"] + [f"<x{i}>" for i in range(64 - len(CHARS) - 1 - len(CONTROL))] + CONTROL
assert len(TOKENS) == 64
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_gguf(model, path: Path) -> Path:
    """``model``: a transformers Qwen2ForCausalLM / Qwen3ForCausalLM with a 64-row vocabulary -> ``path``."""
    import gguf
    import torch

    cfg = model.config
    arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[cfg.model_type]
    name = cfg.model_type
    w = gguf.GGUFWriter(str(path), name)
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.model_type == "qwen3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.CONTROL if t in CONTROL else gguf.TokenType.NORMAL for t in TOKENS])
    w.add_token_merges(["a b"])
    w.add_eos_token_id(TOKENS.index("<|im_end|>"))
    w.add_bos_token_id(TOKENS.index("<|endoftext|>"))
    w.add_pad_token_id(TOKENS.index("<|endoftext|>"))
    w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise KeyError(f"no GGUF name for {hf_name}")
        w.add_tensor(gguf_name, tensor.detach().to(torch.float32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
