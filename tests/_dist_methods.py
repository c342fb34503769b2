"""Compress tiny models with every torchrun-ready method; rank 0 writes each result's tensors.

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_dist_methods.py OUT`` or
``python tests/_dist_methods.py OUT`` (one process); tests/test_distributed.py compares the two.
The models and calibration samples are built from fixed seeds, identically in every process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

if __package__:  # imported by tests/test_distributed.py
    from .tiny_models import tiny_model, tiny_processor, tiny_tokenizer
else:  # run as a script: tests/ is sys.path[0]
    from tiny_models import tiny_model, tiny_processor, tiny_tokenizer

NSAMPLES, SEQLEN = 5, 24  # 5 samples: an uneven split (3 + 2) over two ranks

# name -> (model kind, method, scheme or sparsity, options)
CASES = {
    "rtn": ("llama", "rtn", "w8a8", {}),
    "smoothquant": ("llama", "smoothquant", "w8a8", {}),
    "awq": ("llama", "awq", "w4a16", {"max_tokens": 64, "grid": 4}),  # 64 of 120 tokens: the subsample path
    "mbq": ("llama", "mbq", "w4a8", {"max_tokens": 200, "grid": 4}),
    "masquant": ("llama", "masquant", "w4a8", {"epochs": 2}),
    "masquant_vl": ("qwen2_5_vl", "masquant", "w4a8", {"epochs": 1}),  # image tokens: CMC second moments
    "larosa": ("llama", "larosa", 0.4, {}),
}


def samples(kind: str, tok, n: int = NSAMPLES, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    if kind == "llama":
        return [{"input_ids": torch.randint(0, len(tok) - 10, (1, SEQLEN), generator=g)} for _ in range(n)]
    from PIL import Image

    proc = tiny_processor(kind, tok)
    out = []
    for s in range(seed * 100, seed * 100 + n):  # 112 x 112 images: 16 image tokens each
        img = Image.fromarray((np.random.default_rng(s).random((112, 112, 3)) * 255).astype("uint8"))
        enc = proc(text=["<|vision_start|><|image_pad|><|vision_end|> the quick brown fox" + " jumps" * s],
                   images=[img], return_tensors="pt")
        out.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k != "attention_mask"})
    return out


@torch.no_grad()
def logits(model, sample) -> torch.Tensor:
    return model(**sample, use_cache=False).logits.float()


def run_case(name: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The compressed model's tensors, plus ``logits.fp`` / ``logits.q``: its output on a held-out sample
    before and after; and the calibration tokens of each rank."""
    import mmcompress

    kind, method, arg, options = CASES[name]
    tok = tiny_tokenizer()
    model, tok = tiny_model(kind, layers=3, tokenizer=tok, seed=0)
    calib = samples(kind, tok)
    held_out = samples(kind, tok, n=1, seed=1)[0]
    fp = logits(model, held_out)
    if method == "larosa":
        mmcompress.sparsify(model, calib, method, arg, progress=False, **options)
    else:
        mmcompress.quantize(model, calib, method, arg, progress=False, **options)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state.update({"logits.fp": fp, "logits.q": logits(model, held_out)})
    return state, list(model._mmcompress_rank_tokens)


def main(out_dir: str) -> None:
    from safetensors.torch import save_file

    from mmcompress.distributed import joined

    torch.set_num_threads(1)
    out = Path(out_dir)
    with joined("cpu") as world:
        for name in CASES:
            state, rank_tokens = run_case(name)
            if world.rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                state = {k: v.clone() for k, v in state.items()}  # tied weights share storage
                save_file(state, str(out / f"{name}.safetensors"), metadata={"rank_tokens": repr(rank_tokens)})


if __name__ == "__main__":
    main(sys.argv[1])
