"""A tiny stand-in for MiniCPM-Llama3-V-2.5's ``modeling_minicpmv.py`` (remote code; tests only).

The structure mmcompress relies on is the real one: ``MiniCPMV`` holds the language model in
``self.llm`` (a ``LlamaForCausalLM``), a vision module ``self.vpm`` and a perceiver ``self.resampler``
whose learned queries cross-attend to the patch features and project them with a parameter matrix
``proj``; ``forward(data)`` takes one dict (input_ids, pixel_values: per sample a list of images,
tgt_sizes, image_bound: per sample ``[n, 2]`` start/end token spans, position_ids), embeds the tokens,
writes each image's ``query_num`` features over its span (``get_vllm_embedding``) and runs
``self.llm(inputs_embeds=...)``.  The vision module is smaller than the real SigLIP/Idefics2 tower.
"""

import os
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedModel

from .configuration_minicpm import MiniCPMVConfig

if os.environ.get("MMCOMPRESS_REMOTE_CODE_SENTINEL"):  # lets tests see whether this file was ever imported
    Path(os.environ["MMCOMPRESS_REMOTE_CODE_SENTINEL"]).write_text("imported")


class VisionTower(nn.Module):
    def __init__(self, config):
        super().__init__()
        vc = config.vision_config
        self.embed_dim = vc["hidden_size"]
        self.patch_embedding = nn.Conv2d(3, self.embed_dim, config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros((config.image_size // config.patch_size) ** 2,
                                                           self.embed_dim))
        self.encoder = nn.TransformerEncoderLayer(self.embed_dim, vc["num_heads"], vc["intermediate_size"],
                                                  dropout=0.0, batch_first=True, norm_first=True)
        self.post_layernorm = nn.LayerNorm(self.embed_dim)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2) + self.position_embedding
        return self.post_layernorm(self.encoder(x))


class Resampler(nn.Module):
    def __init__(self, num_queries, embed_dim, num_heads, kv_dim):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q, self.ln_kv, self.ln_post = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.proj = nn.Parameter((embed_dim ** -0.5) * torch.randn(embed_dim, embed_dim))

    def forward(self, x, tgt_sizes=None):
        kv = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        out = self.attn(q, kv, kv, need_weights=False)[0]
        return self.ln_post(out) @ self.proj


class MiniCPMVPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMVConfig
    base_model_prefix = "llm"
    _no_split_modules = ["LlamaDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)


class MiniCPMV(MiniCPMVPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.llm = LlamaForCausalLM(config)
        self.vpm = VisionTower(config)
        self.vision_dim = self.vpm.embed_dim
        self.embed_dim = config.hidden_size
        self.resampler = Resampler(config.query_num, self.embed_dim, self.embed_dim // 32 or 1, self.vision_dim)
        self.post_init()

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.llm.lm_head

    def get_vllm_embedding(self, data):
        dtype = self.llm.model.embed_tokens.weight.dtype
        vision_hidden_states = []
        images = [img for sample in data["pixel_values"] for img in sample]
        if images:
            features = self.resampler(self.vpm(torch.stack(images).to(dtype)))
            start = 0
            for sample in data["pixel_values"]:
                vision_hidden_states.append(features[start:start + len(sample)])
                start += len(sample)
        else:
            vision_hidden_states = [[] for _ in data["pixel_values"]]
        vllm_embedding = self.llm.model.embed_tokens(data["input_ids"])
        for i in range(len(data["input_ids"])):
            cur_vs_hs = vision_hidden_states[i]
            if len(cur_vs_hs) > 0 and len(data["image_bound"][i]) > 0:
                cur_vllm_emb = vllm_embedding[i]
                image_indices = torch.stack([torch.arange(r[0], r[1], dtype=torch.long)
                                             for r in data["image_bound"][i]]).to(vllm_embedding.device)
                cur_vllm_emb.scatter_(0, image_indices.view(-1, 1).repeat(1, cur_vllm_emb.shape[-1]),
                                      cur_vs_hs.reshape(-1, cur_vs_hs.shape[-1]).to(cur_vllm_emb.dtype))
        return vllm_embedding, vision_hidden_states

    def forward(self, data, **kwargs):
        vllm_embedding, vision_hidden_states = self.get_vllm_embedding(data)
        position_ids = data["position_ids"]
        if position_ids.dtype != torch.int64:
            position_ids = position_ids.long()
        return self.llm(input_ids=None, position_ids=position_ids, inputs_embeds=vllm_embedding, **kwargs)

    def generate(self, input_ids=None, pixel_values=None, tgt_sizes=None, image_bound=None, attention_mask=None,
                 **kwargs):
        data = {"input_ids": input_ids, "pixel_values": pixel_values, "tgt_sizes": tgt_sizes, "image_bound": image_bound}
        with torch.inference_mode():
            inputs_embeds, _ = self.get_vllm_embedding(data)
            return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
