"""A tiny local remote-code MiniCPM-V directory (tests/remote_code/minicpmv: an ``llm``, a vision module, a
resampler, ``image_bound``) with random weights; no hub.  The model directory is what a user has for
MiniCPM-Llama3-V-2.5: config.json with an ``auto_map`` naming the Python files next to the weights."""

import importlib
import importlib.machinery
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch

from ._families import TEXT

REMOTE_CODE = Path(__file__).parent / "remote_code" / "minicpmv"
AUTO_MAP = {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV",
            "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"}
IMAGE_TOKENS = 4  # query_num: the resampler's features per image


def _mirror():
    """The test's own copy of the modeling code, imported as a package (to build the random weights)."""
    name = "_mmcompress_tests_minicpmv"
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(REMOTE_CODE)]
        sys.modules[name] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{name}.modeling_minicpmv")


def write_remote_minicpmv(path, tokenizer, *, layers: int = 2, seed: int = 0) -> Path:
    mod = _mirror()
    eos = tokenizer.eos_token_id
    cfg = mod.MiniCPMVConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, bos_token_id=eos, eos_token_id=eos,
                             pad_token_id=eos, query_num=IMAGE_TOKENS, image_size=16, patch_size=8)
    torch.manual_seed(seed)
    model = mod.MiniCPMV(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("llm.model.") and n.endswith("norm.weight"):  # non-trivial norms for the folds
                p.copy_(p + torch.rand(p.shape, generator=g) * 0.8 - 0.2)
        model.resampler.query.normal_(generator=g)
        model.vpm.position_embedding.normal_(std=0.5, generator=g)
    path = Path(path)
    model.save_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    raw.update(auto_map=AUTO_MAP, architectures=["MiniCPMV"])
    (path / "config.json").write_text(json.dumps(raw, indent=1))
    for f in REMOTE_CODE.glob("*.py"):
        shutil.copyfile(f, path / f.name)
    tokenizer.save_pretrained(path)
    return path


def remote_inputs(tok, seed: int = 0, text: str = TEXT, image: bool = True) -> dict:
    """Keyword inputs (the adapter's calling convention turns them into MiniCPM-V's ``data`` dict): one
    16×16 image written over the tokens [1, 1 + IMAGE_TOKENS) as ``image_bound`` says."""
    words = tok(text, return_tensors="pt")["input_ids"]
    if not image:
        return {"input_ids": words}
    g = torch.Generator().manual_seed(seed)
    start, end = (tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    span = torch.tensor([[start] + [tok.eos_token_id] * IMAGE_TOKENS + [end]])
    return {"input_ids": torch.cat([span, words], 1), "pixel_values": [[torch.randn(3, 16, 16, generator=g)]],
            "tgt_sizes": [torch.tensor([[2, 2]])], "image_bound": [torch.tensor([[1, 1 + IMAGE_TOKENS]])]}
