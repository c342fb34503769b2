"""Every linear of every decoder layer of every supported family is compressed or deliberately skipped."""

import pytest
import torch
from torch import nn

from mmcompress.models.adapters import FAMILIES, LayerKind, UnsupportedModelError, get_adapter
from .tiny_models import TINY_KINDS, tiny_model

# tiny kind -> the config.model_type it builds; every family in FAMILIES must have one
KIND_OF_TYPE = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gemma3_text": "gemma3",
                "qwen2_5_vl": "qwen2_5_vl", "qwen2_5_omni_thinker": "qwen2_5_omni", "qwen3": "qwen3",
                "gemma3": "gemma3_vl", "idefics3": "idefics3", "smolvlm": "smolvlm", "qwen3_vl": "qwen3_vl",
                "qwen3_5_text": "qwen3_5", "qwen3_5": "qwen3_5_vl", "minicpmv4_6": "minicpmv4_6", "minicpmv4_7": "minicpmv4_7",
                "qwen3_omni_moe_thinker": "qwen3_omni_moe"}
# families whose modeling code ships in the model directory: a tiny local remote-code directory (tests/_remote.py)
REMOTE_TYPES = {"minicpmv": "MiniCPMV"}


def test_every_family_has_a_tiny_model():
    assert set(KIND_OF_TYPE) | set(REMOTE_TYPES) == set(FAMILIES)
    assert set(KIND_OF_TYPE.values()) <= set(TINY_KINDS)


def _model(model_type, tokenizer, tmp_path):
    if model_type in REMOTE_TYPES:
        from mmcompress.models.loading import load_hf_model

        from ._remote import write_remote_minicpmv

        return load_hf_model(write_remote_minicpmv(tmp_path / "remote", tokenizer), trust_remote_code=True)
    return tiny_model(KIND_OF_TYPE[model_type], tokenizer=tokenizer)[0]


def _linear_like(mod: nn.Module) -> bool:
    """An ``nn.Linear`` or a module that owns a 2-D weight matrix (an MoE router: ``F.linear(x, self.weight)``)."""
    w = mod._parameters.get("weight")
    return isinstance(mod, nn.Linear) or (w is not None and w.dim() == 2 and not isinstance(mod, nn.Embedding))


@pytest.mark.parametrize("model_type", sorted({**KIND_OF_TYPE, **REMOTE_TYPES}))
def test_every_decoder_linear_is_compressed_or_skipped(model_type, tokenizer, tmp_path):
    model = _model(model_type, tokenizer, tmp_path)
    assert model.config.model_type == model_type
    adapter = get_adapter(model)
    kinds = set()
    for i, layer in enumerate(adapter.layers):
        linears = {n for n, m in layer.named_modules() if _linear_like(m)}
        assert not [n for n, p in layer.named_parameters() if p.dim() == 3 and not isinstance(
            layer.get_submodule(n.rpartition(".")[0]), nn.Conv1d)], "fused 3-D weights (MoE experts) left in the layer"
        compressed, skipped = adapter.linear_names(i), adapter.skipped(i)
        assert len(compressed) == len(set(compressed)), f"layer {i}: a linear is in two groups"
        assert not set(compressed) & set(skipped)
        assert linears == set(compressed) | set(skipped), (
            f"layer {i}: not covered {sorted(linears - set(compressed) - set(skipped))}, "
            f"declared but absent {sorted(set(compressed) | set(skipped) - linears)}")
        for g in adapter.layer_groups(i):
            readers = g.modules(layer)
            assert len({m.in_features for m in readers}) == 1, f"{g.name}: readers of different widths"
            if g.producer is not None:
                prod = layer.get_submodule(g.producer)
                width = prod.weight.shape[0]
                assert width == readers[0].in_features or (g.producer_kind == "linear" and width < readers[0].in_features)
        kinds.add(tuple(sorted(compressed)))
    assert adapter.hybrid == (len(kinds) > 1)
    # the per-layer view the engine hands to methods
    for i in range(len(adapter.layers)):
        assert adapter.at_layer(i).linear_names() == adapter.linear_names(i)


def test_hybrid_layers_follow_layer_types(tokenizer):
    model, _ = tiny_model("qwen3_5", layers=4, tokenizer=tokenizer)
    adapter = get_adapter(model)
    types = model.config.layer_types
    for i, t in enumerate(types):
        assert any(p.startswith("linear_attn.") for p in adapter.linear_names(i)) == (t == "linear_attention")
    with pytest.raises(UnsupportedModelError, match="several kinds"):
        adapter.groups  # noqa: B018 - a whole-model group list does not exist for a hybrid model


def test_unsupported_architecture_is_refused_with_the_list(tokenizer):
    model, _ = tiny_model("llama", tokenizer=tokenizer)
    model.config.model_type = "qwen3_omni_moe"  # the whole Omni model (thinker + talker + code2wav)
    with pytest.raises(UnsupportedModelError) as e:
        get_adapter(model)
    msg = str(e.value)
    assert "use the thinker" in msg and "supported model types:" in msg and "minicpmv4_6" in msg
    assert "qwen3_omni_moe_thinker" in msg


def test_unknown_layer_type_is_refused(tokenizer):
    model, _ = tiny_model("qwen3_5", tokenizer=tokenizer)
    model.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="sliding_attention"):
        get_adapter(model)


def test_layer_kinds_are_declarative(tokenizer):
    for model_type, fam in FAMILIES.items():
        if callable(fam.layers):  # built from the config (MoE: one mlp_out group per expert)
            config = tiny_model(KIND_OF_TYPE[model_type], tokenizer=tokenizer)[0].config
            kinds = fam.kinds(config, config.get_text_config().num_hidden_layers)
        else:
            kinds = [fam.layers] if isinstance(fam.layers, LayerKind) else list(fam.layers.values())
        for k in kinds:
            assert {g.role for g in k.groups} == {"attn_in", "attn_out", "mlp_in", "mlp_out"}
            assert len({g.name for g in k.groups}) == len(k.groups)  # statistics are keyed by name


def test_readme_support_table_matches_the_adapters():
    """The README's table says what the adapters (tested above and in test_families.py) support."""
    import re
    from pathlib import Path

    import transformers

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.split("## Supported models", 1)[1].split("\n\n", 2)[1]
    covered = set()
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        quant, sparse = cells[2], cells[3]
        for cls in re.findall(r"`(\w+)`", cells[1]):
            remote = {v: k for k, v in REMOTE_TYPES.items()}
            model_type = remote[cls] if cls in remote else getattr(transformers, cls).config_class.model_type
            fam = FAMILIES.get(model_type)
            assert (fam is not None) == quant.startswith("yes"), (cls, quant)
            if fam is None:
                continue
            covered.add(model_type)
            merged, reference = (s.strip(" *") for s in sparse.split("/"))
            assert (reference == "yes") == (fam.sparsity_blocker is None), (cls, sparse)
            assert (merged == "yes") == (fam.sparsity_blocker is None and fam.merged_blocker is None), (cls, sparse)
    assert covered == set(FAMILIES)
