"""Tiny random Hugging Face models of the families fasttfm.hf covers (shared by tests/test_hf_*.py).

Each builder returns an fp32 model in train mode with random weights (nothing downloaded), sized
as small as the family allows: 2 layers, hidden 64, 4 query heads over 2 kv heads (head dim 16),
vocab 128, and a sliding window of 8 (< the test sequences) where the family has one."""
import torch
import transformers

VOCAB = 128
WINDOW = 8
_COMMON = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, attention_dropout=0.0,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _lm(config_cls, model_cls, **extra):
    def build():
        torch.manual_seed(0)
        cfg = config_cls(**{**_COMMON, **extra})
        model = model_cls(cfg)
        model.loss_type = "ForCausalLM"
        return model.train()
    return build


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"
    return model.train()


def _gemma2():
    """Attention-logit softcapping and a sliding layer; the reference runs eager (HF's sdpa drops the softcap)."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(**{**_COMMON, "head_dim": 16}, sliding_window=WINDOW, attn_logit_softcapping=0.5,
                                    query_pre_attn_scalar=16)
    cfg._attn_implementation = "eager"
    model = transformers.Gemma2ForCausalLM(cfg)
    model.loss_type = "ForCausalLM"
    return model.train()


# family -> builder of a causal LM (generate, padding, packing, caches)
CAUSAL_LMS = {
    "llama": _lm(transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": _lm(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=WINDOW),
    "mixtral": _lm(transformers.MixtralConfig, transformers.MixtralForCausalLM, sliding_window=WINDOW,
                   num_local_experts=2, num_experts_per_tok=1),
    "qwen2": _lm(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, use_sliding_window=True,
                 sliding_window=WINDOW, max_window_layers=1),
    "starcoder2": _lm(transformers.Starcoder2Config, transformers.Starcoder2ForCausalLM, sliding_window=WINDOW,
                      residual_dropout=0.0, embedding_dropout=0.0),
    "gemma3": _lm(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, head_dim=16, sliding_window=WINDOW,
                  layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16),
    "cohere2": _lm(transformers.Cohere2Config, transformers.Cohere2ForCausalLM, sliding_window=WINDOW,
                   layer_types=["sliding_attention", "full_attention"]),
    "stablelm": _lm(transformers.StableLmConfig, transformers.StableLmForCausalLM),
    "gpt2": _gpt2,
    "gemma2": _gemma2,
}


def _modernbert():
    """Alternating local (window 8 = +-4 bidirectional) and global layers, as ModernBERT's config says."""
    torch.manual_seed(0)
    cfg = transformers.ModernBertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, local_attention=WINDOW, global_attn_every_n_layers=2,
                                        max_position_embeddings=128, attention_dropout=0.0, mlp_dropout=0.0,
                                        embedding_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        cls_token_id=1, sep_token_id=2)
    return transformers.ModernBertForMaskedLM(cfg).train()


def _bart():
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                  decoder_ffn_dim=128, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
                                  activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  decoder_start_token_id=2, forced_eos_token_id=None)
    return transformers.BartForConditionalGeneration(cfg).train()


def _whisper():
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=64, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_ffn_dim=128, max_source_positions=16, max_target_positions=64,
                                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                                     suppress_tokens=None, begin_suppress_tokens=None)
    return transformers.WhisperForConditionalGeneration(cfg).train()


# family -> builder of an encoder or encoder-decoder model
OTHER_MODELS = {"modernbert": _modernbert, "bart": _bart, "whisper": _whisper}


# more decoder families on HF's attention interface, built from their defaults plus the common
# tiny sizes (dropouts 0): padded training and left-padded generation are checked for each
MORE_LMS = ("apertus", "arcee", "bitnet", "cohere", "ernie4_5", "exaone4", "gemma", "glm4", "gpt_neox", "granite",
            "granitemoe", "helium", "lfm2", "nemotron", "olmo", "olmo2", "opt", "phi", "phi3", "qwen2_moe", "qwen3",
            "qwen3_moe", "seed_oss", "smollm3")


def auto_lm(model_type):
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(model_type, **_COMMON, head_dim=16, dropout=0.0, residual_dropout=0.0,
                                            hidden_dropout=0.0, attention_out_dropout=0.0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.loss_type = "ForCausalLM"
    return model.train()
