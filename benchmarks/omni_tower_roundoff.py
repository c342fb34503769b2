#!/usr/bin/env python
"""How far float round-off in the Omni towers' outputs moves a W8A8 artifact's prompt log-probs.

    python benchmarks/omni_tower_roundoff.py [--method masquant|rtn] [--seeds 3]

vLLM serves an Omni export with its own vision and audio towers, whose outputs differ from transformers' at
float round-off; per-token int8 activation codes can turn such a difference into a whole-code flip.  This
builds the tiny Omni artifact of ``tests/test_vllm_plugin.py`` (MASQuant W8A8, tied vectors, CMC; or RTN),
loads it with ``mmcompress.load``, and for the text, image and audio prompts prints how much the prompt
log-probs move when both towers' outputs are scaled by ``1 + 1e-7·N(0, 1)`` (``--seeds`` draws), on the
modality path and on the text path (router off), and how much removing the modality path moves them: the
noise a comparison with vLLM's towers must allow against the effect it must still see.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import test_vllm_plugin as T  # noqa: E402  (the test's artifact, prompts and media)

import mmcompress  # noqa: E402
from mmcompress.models.modality import modality_context  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="masquant", choices=("masquant", "rtn"))
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="omni-roundoff-"))
    kw = {"epochs": 1, "tie": True} if a.method == "masquant" else {}
    art, proc = T._omni_artifact(root, a.method, **kw)
    requests = T._omni_requests(root)
    model = mmcompress.load(art).float().eval()
    towers = [model.model.visual, model.model.audio_tower] if hasattr(model.model, "visual") else \
        [model.visual, model.audio_tower]
    kinds = ("text", "image", "audio")

    @torch.no_grad()
    def logprobs(r):
        enc = dict(proc(text=[r["prompt"]], return_tensors="pt", **T._omni_media(r)))
        with modality_context(None):
            lp = torch.log_softmax(model(**enc).logits[0, :-1].float(), -1)
        return lp.gather(-1, enc["input_ids"][0, 1:, None])[:, 0]

    def report(label, d):
        print(f"{label}: max {float(d.max()):.3g}, mean {float(d.mean()):.3g}, positions > 1e-4: "
              f"{int((d > 1e-4).sum())} of {d.numel()}")

    def noise(path):
        for k, r in enumerate(requests):
            base = logprobs(r)
            for seed in range(a.seeds):
                g = torch.Generator().manual_seed(seed)

                def perturb(mod, args, out, g=g):
                    ts = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, tuple) else \
                        [v for v in out.values() if isinstance(v, torch.Tensor)]
                    with torch.no_grad():
                        for t in ts:
                            if t.is_floating_point():
                                t.mul_(1 + 1e-7 * torch.randn(t.shape, generator=g))
                    return out

                hs = [m.register_forward_hook(perturb) for m in towers]
                try:
                    report(f"{path} path, {kinds[k]} prompt, towers x (1 + 1e-7 N), seed {seed}", (logprobs(r) - base).abs())
                finally:
                    for h in hs:
                        h.remove()

    router = getattr(model, "_mmcompress_router", None)
    if router:
        noise("modality")
        with_path = [logprobs(r) for r in requests]
        for h in router:
            h.remove()
        model._mmcompress_router = None
        for k, r in enumerate(requests):
            report(f"modality path removed, {kinds[k]} prompt", (logprobs(r) - with_path[k]).abs())
    noise("text")


if __name__ == "__main__":
    main()
