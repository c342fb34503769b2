"""Train the connector weights of the multimodal testbed models (decoder and Whisper frozen).

    python benchmarks/train_connectors.py --stage audio  --decoder smollm2 --minutes 28
    python benchmarks/train_connectors.py --stage vision --decoder smollm2 --minutes 12

Audio: espeak-ng clips (digit strings + Wikipedia sentences, training voices only) -> the stock
Omni audio tower holding Whisper-base; Whisper layers 0-4 frozen (their output is cached once);
trained: ``layers.5`` (Whisper's last layer, fine-tuned), ``ln_post`` (Whisper's final norm,
fine-tuned), ``proj`` (new).  Target = transcript after "<audio> Transcribe:", loss on it only.
The decoder runs in bf16 on ``inputs_embeds`` (exactly the Omni thinker's computation on audio +
text input: audio positions are sequential, verified to 0.0 logits difference).

Vision: (1) pre-train the small Qwen2.5-VL vision tower with four attribute heads (colour, shape,
count, position) on synthetic images, every merged token predicting the image's attributes;
(2) train only the ``merger`` through the frozen decoder (M-RoPE positions from ``get_rope_index``)
on templated questions -> exact answers.

Outputs: ``src/mmcompress_testbed/assets/{audio_connector,vision}-<decoder>.safetensors`` (fp16) and a
JSON record next to them.  One thread (``torch.set_num_threads(1)``), fixed seeds, tqdm progress.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmcompress_testbed import mm_data as D
from mmcompress_testbed import mm_sources as S
from mmcompress_testbed import multimodal as M

ASSETS = M.ASSETS


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def load_decoder(decoder: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = S.decoder_dir(decoder)
    lm = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(d))
    M.add_mm_tokens(tok)
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm.to(torch.bfloat16), tok


def embed(lm, ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings with the testbed's zero rows for the added multimodal tokens."""
    V = lm.config.vocab_size
    e = lm.get_input_embeddings()(ids.clamp(max=V - 1))
    return e.masked_fill((ids >= V).unsqueeze(-1), 0.0)


def lm_loss(lm, embeds: list[torch.Tensor], targets: list[list[int]]):
    """Right-padded batch of per-sample input embeddings (prompt + target embeddings already
    concatenated); loss on the target tokens only."""
    B = len(embeds)
    L = max(e.shape[0] for e in embeds)
    H = embeds[0].shape[1]
    x = embeds[0].new_zeros(B, L, H)
    mask = torch.zeros(B, L, dtype=torch.long)
    pos_rows, pos_cols, labels = [], [], []
    for i, (e, t) in enumerate(zip(embeds, targets)):
        n = e.shape[0]
        x[i, :n] = e
        mask[i, :n] = 1
        start = n - len(t)
        for j, tid in enumerate(t):
            pos_rows.append(i)
            pos_cols.append(start + j - 1)
            labels.append(tid)
    h = lm.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
    hs = h[torch.tensor(pos_rows), torch.tensor(pos_cols)]
    logits = lm.lm_head(hs).float()
    return F.cross_entropy(logits, torch.tensor(labels))


def lr_at(frac: float, step: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def save_fp16(sd: dict, path: Path, meta: dict):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}, str(tmp),
              metadata={k: str(v) for k, v in meta.items()})
    tmp.rename(path)


# ==================================================================================================
# audio
# ==================================================================================================


def audio_tower(hidden: int):
    from transformers import Qwen2_5OmniAudioEncoderConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    cfg = Qwen2_5OmniAudioEncoderConfig(**M.AUDIO_CFG, output_dim=hidden)
    tower = Qwen2_5OmniAudioEncoder(cfg).float().eval()
    missing, unexpected = tower.load_state_dict(S.whisper_encoder_state(), strict=False)
    assert not unexpected, unexpected
    return tower


def audio_features(tower, fe, wavs, progress=True):
    """Per clip: (mel length, input of the last Whisper layer [T50, 512] fp16), exactly as the stock
    tower computes it on the processor's features."""
    from tqdm.auto import tqdm

    grabbed = {}
    last = tower.layers[-1]
    h = last.register_forward_pre_hook(lambda m, args, kw: grabbed.__setitem__("x", (kw.get("hidden_states") if
                                                                                       not args else args[0])),
                                       with_kwargs=True)
    out = []
    try:
        for w in tqdm(wavs, desc="whisper features", disable=not progress):
            f = fe(w, sampling_rate=D.SR, return_attention_mask=True, padding="max_length", return_tensors="pt")
            m = f["attention_mask"][0].bool()
            feats = f["input_features"][0][:, m]
            n = int(m.sum())
            with torch.no_grad():
                tower(feats, feature_lens=torch.tensor([n]))
            out.append((n, grabbed["x"].to(torch.float16).clone()))
    finally:
        h.remove()
    return out


def connector_forward(conn, feats: list[tuple[int, torch.Tensor]]):
    """Trainable tail of the stock tower on cached inputs of its last layer -> list of [n_tokens, hidden]."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import get_audio_cu_seqlens, get_pool_indices

    lens = torch.tensor([n for n, _ in feats])
    x = torch.cat([f.float() for _, f in feats])
    cu = get_audio_cu_seqlens(lens)
    y = conn["layer"](x, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))[0]
    pi = get_pool_indices(lens)
    y = (y[pi] + y[pi + 1]) / 2
    y = conn["proj"](conn["ln_post"](y))
    n_tok = ((lens - 1) // 2 + 1 - 2) // 2 + 1
    return list(y.split(n_tok.tolist()))


def build_audio_data(args, tok, tower, fe):
    cache = S._cache(f"train-audio-v1-{args.n_digits}-{args.n_sentences}.pt")
    if cache.is_file():
        log(f"audio features from {cache}")
        return torch.load(cache)
    sents = D.wiki_sentences(0, 8000)
    test_keys = D.test_digit_keys()
    items = D.make_speech_items("digits", args.n_digits, 101, D.TRAIN_VOICES, exclude_digits=test_keys)
    items += D.make_speech_items("sentence", args.n_sentences, 102, D.TRAIN_VOICES, sentences=sents)
    t = time.time()
    wavs = D.render(items, progress=True)
    log(f"rendered {len(wavs)} clips in {time.time() - t:.0f}s ({sum(len(w) for w in wavs) / D.SR / 60:.1f} min audio)")
    t = time.time()
    feats = audio_features(tower, fe, wavs)
    log(f"features in {time.time() - t:.0f}s")
    data = [dict(kind=it["kind"], transcript=it["transcript"], n=n, x=x) for it, (n, x) in zip(items, feats)]
    torch.save(data, cache)
    return data


def audio_prompt_ids(tok, n_audio: int) -> list[int]:
    return tok(M.AUDIO_PROMPT.replace("<|AUDIO|>", "<|AUDIO|>" * n_audio))["input_ids"]


@torch.no_grad()
def greedy_transcribe(lm, tok, conn, feats, max_new=14):
    outs = []
    for f in feats:
        a = connector_forward(conn, [f])[0]
        ids = torch.tensor(audio_prompt_ids(tok, a.shape[0]))
        e = embed(lm, ids)
        e[ids == tok.audio_token_id] = a.to(e.dtype)
        gen = []
        x = e[None]
        out = lm(inputs_embeds=x, use_cache=True)
        for _ in range(max_new):
            nxt = int(out.logits[0, -1].argmax())
            if nxt == tok.eos_token_id or nxt == tok.convert_tokens_to_ids("<|endoftext|>"):
                break
            gen.append(nxt)
            out = lm(inputs_embeds=embed(lm, torch.tensor([[nxt]])), cache=out.cache, use_cache=True)
        outs.append(tok.decode(gen))
    return outs


def stage_audio(args):
    from transformers import WhisperFeatureExtractor

    from mmcompress.eval.asr import wer

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    lm, tok = load_decoder(args.decoder)
    H = lm.config.hidden_size
    tower = audio_tower(H)
    fe = WhisperFeatureExtractor(feature_size=80)
    data = build_audio_data(args, tok, tower, fe)
    # held-out voice check set (small, not the fixed test set's items)
    chk_items = D.make_speech_items("digits", 8, 555, [D.TEST_VOICE], exclude_digits=D.test_digit_keys())
    chk = audio_features(tower, fe, D.render(chk_items), progress=False)

    if args.resume:  # continue from the committed / last saved connector
        prev = M.load_asset(f"audio_connector-{args.decoder}.safetensors")
        missing, unexpected = tower.load_state_dict(prev, strict=False)
        assert not unexpected, unexpected
        log(f"resumed from the saved connector ({len(prev)} tensors)")
    conn = torch.nn.ModuleDict(dict(layer=tower.layers[-1], ln_post=tower.ln_post, proj=tower.proj)).float().train()
    for p in conn.parameters():
        p.requires_grad_(True)
    groups = [dict(params=list(conn["layer"].parameters()), lr=args.lr * 0.3, base=args.lr * 0.3),
              dict(params=list(conn["ln_post"].parameters()) + list(conn["proj"].parameters()), lr=args.lr,
                   base=args.lr)]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    digits = [d for d in data if d["kind"] == "digits"]
    sents = [d for d in data if d["kind"] == "sentence"]
    tgt_cache = {}

    def target(tr):
        if tr not in tgt_cache:
            tgt_cache[tr] = tok(" " + tr, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return tgt_cache[tr]

    rng = random.Random(args.seed)
    ctc_hist = ctc_phase(args, lm, tok, conn, digits, sents, rng) if args.ctc_minutes > 0 else []
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    budget = args.minutes * 60
    t0 = time.time()
    step, ema = 0, None
    hist = []
    from tqdm.auto import tqdm

    bar = tqdm(total=int(budget), desc="audio connector", unit="s", mininterval=5)
    last_t = t0
    while time.time() - t0 < budget:
        n_d = sum(rng.random() < args.digit_frac for _ in range(args.batch))
        if n_d == args.batch:  # length bucketing (less padding): 8 similar-length digit clips out of 32
            cand = sorted(rng.sample(digits, 4 * args.batch), key=lambda b: b["n"])
            j = rng.randrange(0, 3 * args.batch + 1)
            batch = cand[j:j + args.batch]
        else:
            batch = rng.sample(digits, n_d) + rng.sample(sents, args.batch - n_d)
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, step, args.warmup, g["base"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            aud = connector_forward(conn, [(b["n"], b["x"]) for b in batch])
        embeds, tgts = [], []
        for b, a in zip(batch, aud):
            ids = torch.tensor(audio_prompt_ids(tok, a.shape[0]))
            t = target(b["transcript"])
            e = embed(lm, torch.cat([ids, torch.tensor(t)]))
            mask = torch.zeros(e.shape[0], dtype=torch.bool)
            mask[: ids.shape[0]] = ids == tok.audio_token_id
            e = e.clone()
            e[mask] = a.to(e.dtype)
            embeds.append(e)
            tgts.append(t)
        loss = lm_loss(lm, embeds, tgts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(conn.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        now = time.time()
        bar.update(int(now - last_t))
        last_t = now if int(now - last_t) >= 1 else last_t
        if step % 5 == 0:
            el = now - t0
            hist.append(dict(step=step, minutes=round(el / 60, 2), loss=round(ema, 4)))
            log(f"step {step} {el / 60:.1f} min loss(ema) {ema:.3f} lr {opt.param_groups[1]['lr']:.2e} "
                f"{step * args.batch / el:.2f} samples/s")
        if step % 25 == 0:
            _save_audio(conn, args, hist, step, t0, None, ctc_hist)
    bar.close()
    conn.eval()
    hyp = greedy_transcribe(lm, tok, conn, chk)
    ref = [it["transcript"] for it in chk_items]
    w = wer(ref, hyp)
    log(f"held-out voice check WER {w:.3f}; e.g. {list(zip(ref[:4], hyp[:4]))}")
    _save_audio(conn, args, hist, step, t0, w, ctc_hist)


def ctc_phase(args, lm, tok, conn, digits, sents, rng):
    """Cheap pre-alignment of the connector without running the decoder: CTC over the audio tokens with
    cosine logits against the decoder's (frozen) token embeddings (+ a learned blank vector that is
    discarded), and a norm term keeping the tokens at the embedding scale.  Afterwards the audio tokens
    at spoken words point at those words' embeddings, which the decoder can copy."""
    E = lm.get_input_embeddings().weight.detach().float()
    space = set(tok(" ", add_special_tokens=False)["input_ids"])
    pool = digits if args.ctc_digits_only else digits + sents
    vocab = sorted({i for d in pool for i in tok(" " + d["transcript"], add_special_tokens=False)["input_ids"]
                    if i not in space})
    index = {v: j + 1 for j, v in enumerate(vocab)}
    Ev = F.normalize(E[torch.tensor(vocab)], dim=-1)
    target_norm = E[torch.tensor(vocab)].norm(dim=-1).median().item()
    if args.ctc_digits_only:
        # blank frames are pulled towards the embedding of the space token: the decoder then reads the
        # audio tokens like "   7   3    9  1  "
        blank = E[sorted(space)[0]].clone()
        extra = []
    else:
        blank = torch.nn.Parameter(torch.randn(E.shape[1]) * 0.02)
        extra = [blank]
    params = list(conn.parameters())
    opt = torch.optim.AdamW([dict(params=list(conn["layer"].parameters()), lr=args.lr * 0.3),
                             dict(params=list(conn["ln_post"].parameters()) + list(conn["proj"].parameters()) + extra,
                                  lr=args.lr)], weight_decay=0.01)
    bases = [g["lr"] for g in opt.param_groups]
    t0, step, ema, hist = time.time(), 0, None, []
    budget = args.ctc_minutes * 60
    log(f"CTC phase: {len(vocab)} target tokens, embedding norm {target_norm:.3f}")
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for g, b in zip(opt.param_groups, bases):
            g["lr"] = lr_at(frac, step, args.warmup, b)
        n_d = 16 if args.ctc_digits_only else sum(rng.random() < 0.7 for _ in range(16))
        batch = rng.sample(digits, n_d) + rng.sample(sents, 16 - n_d)
        aud = connector_forward(conn, [(b["n"], b["x"]) for b in batch])
        lens = torch.tensor([a.shape[0] for a in aud])
        x = torch.nn.utils.rnn.pad_sequence(aud, batch_first=False)  # [T, B, H]
        cos = torch.cat([F.normalize(x, dim=-1) @ Ev.T, (F.normalize(x, dim=-1) @ F.normalize(blank, dim=0))[..., None]],
                        -1)
        logits = 10.0 * cos
        logits = torch.cat([logits[..., -1:], logits[..., :-1]], -1)  # blank = class 0
        tg = [torch.tensor([index[i] for i in tok(" " + b["transcript"], add_special_tokens=False)["input_ids"]
                            if i not in space]) for b in batch]
        tl = torch.tensor([len(t) for t in tg])
        ctc = F.ctc_loss(logits.log_softmax(-1), torch.cat(tg), lens, tl, blank=0, zero_infinity=True)
        norms = torch.cat([a.norm(dim=-1) for a in aud])
        loss = ctc + 0.1 * ((norms / target_norm - 1) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + extra, 1.0)
        opt.step()
        step += 1
        ema = ctc.item() if ema is None else 0.95 * ema + 0.05 * ctc.item()
        if step % 10 == 0:
            el = time.time() - t0
            hist.append(dict(step=step, minutes=round(el / 60, 2), ctc=round(ema, 4)))
            log(f"ctc step {step} {el / 60:.1f} min ctc(ema) {ema:.3f} {step * 16 / el:.1f} samples/s")
    return hist


def _save_audio(conn, args, hist, step, t0, check_wer, ctc_hist=()):
    sd = {f"layers.5.{k}": v for k, v in conn["layer"].state_dict().items()}
    sd.update({f"ln_post.{k}": v for k, v in conn["ln_post"].state_dict().items()})
    sd.update({f"proj.{k}": v for k, v in conn["proj"].state_dict().items()})
    meta = dict(decoder=args.decoder, steps=step, minutes=round((time.time() - t0) / 60, 2), seed=args.seed,
                batch=args.batch, lr=args.lr, final_loss=hist[-1]["loss"] if hist else None, check_wer=check_wer,
                command=" ".join(sys.argv))
    save_fp16(sd, ASSETS / f"audio_connector-{args.decoder}.safetensors", meta)
    (ASSETS / f"audio_connector-{args.decoder}.json").write_text(
        json.dumps(dict(meta, ctc_history=list(ctc_hist), history=hist), indent=1))


# ==================================================================================================
# vision
# ==================================================================================================


def stage_vision(args):
    from mmcompress_testbed import mm_vision

    mm_vision.train(args, load_decoder, embed, lm_loss, lr_at, save_fp16, log)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["audio", "vision"], required=True)
    ap.add_argument("--decoder", default="smollm2", choices=list(M.DECODERS))
    ap.add_argument("--minutes", type=float, default=28.0, help="training wall-clock budget (after data prep)")
    ap.add_argument("--ctc-digits-only", action="store_true", help="CTC phase on digit clips, blank = space token")
    ap.add_argument("--resume", action="store_true", help="start from the saved connector asset (audio: connector; "
                    "vision: tower + merger, merger stage only)")
    ap.add_argument("--ctc-minutes", type=float, default=5.0, help="audio: CTC pre-alignment budget (no decoder)")
    ap.add_argument("--pretrain-minutes", type=float, default=3.0, help="vision tower pre-training budget")
    ap.add_argument("--n-digits", type=int, default=1600)
    ap.add_argument("--n-sentences", type=int, default=800)
    ap.add_argument("--digit-frac", type=float, default=0.75)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"audio": stage_audio, "vision": stage_vision}[args.stage](args)


if __name__ == "__main__":
    main()
