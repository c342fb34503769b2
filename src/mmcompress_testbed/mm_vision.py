"""Vision connector training for the multimodal testbed (called by ``benchmarks/train_connectors.py``).

Stage 1: the small Qwen2.5-VL vision tower (``multimodal.VISION_CFG``) with four linear attribute heads
on every merged 2x2 token (the merger's ``ln_q`` output): colour, shape, count, position (or "none").
Stage 2: a fresh ``merger`` MLP trained through the frozen decoder (bf16) on templated questions with
exact one-word / two-word answers; the tower stays frozen.
"""

from __future__ import annotations

import json
import random
import sys
import time

import torch
import torch.nn.functional as F

from . import mm_data as D
from . import multimodal as M

HEADS = {"colour": list(D.COLOURS), "shape": D.SHAPES, "count": [str(c) for c in D.COUNTS],
         "position": D.POSITIONS + ["none"]}


def image_processor():
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(min_pixels=M.IMAGE_MIN_PIXELS, max_pixels=M.IMAGE_MAX_PIXELS)


def batch_images(rng, n, ip, qtypes=None):
    imgs, attrs = [], []
    for i in range(n):
        kw = {}
        if qtypes is not None:
            if qtypes[i] == "position":
                kw = {"count": 1}
            elif qtypes[i] == "count":
                kw = {"count": rng.choice(D.COUNTS)}
        img, a = D.make_image(rng, **kw)
        imgs.append(img)
        attrs.append(a)
    px = ip(images=imgs, return_tensors="pt")
    return px["pixel_values"], px["image_grid_thw"], attrs


def vision_tower(hidden: int):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    cfg = Qwen2_5_VLConfig(vision_config=dict(M.VISION_CFG, out_hidden_size=hidden)).vision_config
    return Qwen2_5_VisionTransformerPretrainedModel(cfg).float()


def merged_inputs(tower, pixel_values, grid):
    """Pre-merger tokens grouped 2x2 and normalised (the merger MLP's input), in output order."""
    out = tower(pixel_values, grid_thw=grid)
    h = out.last_hidden_state
    x = tower.merger.ln_q(h).view(-1, tower.merger.hidden_size)
    # undo the window permutation, as the stock forward does after the merger
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

    window_index, _ = get_vision_window_index(grid, spatial_merge_size=tower.spatial_merge_size,
                                              window_size=tower.window_size, patch_size=tower.patch_size)
    return x[torch.argsort(window_index)]


def _labels(attrs, per_image):
    out = {}
    for k, names in HEADS.items():
        vals = []
        for a in attrs:
            v = a[k] if k != "count" else str(a["count"])
            vals.append(names.index(v if v is not None else "none"))
        out[k] = torch.tensor(vals).repeat_interleave(per_image)
    return out


def pretrain(tower, minutes, seed, log, batch=32, lr=2e-3):
    ip = image_processor()
    rng = random.Random(seed)
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(tower.merger.hidden_size, len(v)) for k, v in HEADS.items()})
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    t0, step, hist = time.time(), 0, []
    acc_ema = {k: 0.0 for k in HEADS}
    tower.train()
    while time.time() - t0 < minutes * 60:
        frac = (time.time() - t0) / (minutes * 60)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - frac))
        pv, grid, attrs = batch_images(rng, batch, ip)
        x = merged_inputs(tower, pv, grid)
        per = x.shape[0] // batch
        labels = _labels(attrs, per)
        loss = 0
        for k, hd in heads.items():
            logits = hd(x)
            loss = loss + F.cross_entropy(logits, labels[k])
            acc = (logits.argmax(-1) == labels[k]).float().mean().item()
            acc_ema[k] = 0.9 * acc_ema[k] + 0.1 * acc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            hist.append(dict(step=step, minutes=round((time.time() - t0) / 60, 2), loss=round(loss.item(), 4),
                             **{f"acc_{k}": round(v, 3) for k, v in acc_ema.items()}))
            log(f"pretrain step {step} loss {loss.item():.3f} acc " +
                " ".join(f"{k}={v:.2f}" for k, v in acc_ema.items()))
    tower.eval()
    return hist, heads


ANSWER_WORDS = {"colour": list(D.COLOURS), "shape": D.SHAPES, "count": [str(c) for c in D.COUNTS],
                "position": D.POSITIONS + [None]}


@torch.no_grad()
def init_merger_from_heads(tower, heads, word_embedding, tok, log, target: float = 3.0):
    """Initialise the stock merger MLP (Linear -> GELU -> Linear) so that each image token starts as the
    sum of the decoder's embeddings of its predicted answer words: the first Linear's first rows are the
    (rescaled) attribute heads, the second Linear maps each head unit to its word embedding.  Training
    through the decoder then starts from tokens the decoder can already read."""
    ip = image_processor()
    pv, grid, _ = batch_images(random.Random(99), 32, ip)
    x = merged_inputs(tower, pv, grid)
    mlp = tower.merger.mlp
    l1, l2 = mlp[0], mlp[2]
    l1.weight.mul_(0.1)
    l1.bias.zero_()
    l2.weight.mul_(0.1)
    l2.bias.zero_()
    row = 0
    for k, hd in heads.items():
        z = hd(x)
        m = z.max(-1).values.mean().clamp(min=1.0)
        scale = target / m
        n = hd.weight.shape[0]
        l1.weight[row:row + n] = hd.weight * scale
        l1.bias[row:row + n] = hd.bias * scale
        for j, word in enumerate(ANSWER_WORDS[k]):
            if word is None:
                vec = torch.zeros(l2.weight.shape[0])
            else:
                ids = tok(" " + word, add_special_tokens=False)["input_ids"]
                vec = word_embedding[torch.tensor(ids)].float().mean(0)
            l2.weight[:, row + j] = vec / target
        row += n
    log(f"merger initialised from the attribute heads ({row} units)")


def qa_batch(rng, n, ip, tok):
    qtypes = [rng.choice(list(D.QUESTIONS)) for _ in range(n)]
    pv, grid, attrs = batch_images(rng, n, ip, qtypes)
    qs, ans = [], []
    for a, qt in zip(attrs, qtypes):
        q, an = D.qa_for(a, qt)
        qs.append(q)
        ans.append(an)
    return pv, grid, qs, ans, qtypes


def prompt_ids(tok, question, n_img):
    text = M.IMAGE_PROMPT.format(question=question).replace("<|image_pad|>", "<|image_pad|>" * n_img)
    return tok(text)["input_ids"]


def train(args, load_decoder, embed, lm_loss, lr_at, save_fp16, log):
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    lm, tok = load_decoder(args.decoder)
    H = lm.config.hidden_size
    tower = vision_tower(H)
    t_start = time.time()
    prev_hist = None
    if getattr(args, "resume", False):  # continue the merger stage from the saved tower + merger
        tower.load_state_dict(M.load_asset(f"vision-{args.decoder}.safetensors"))
        prev = json.loads((M.ASSETS / f"vision-{args.decoder}.json").read_text())
        hist1, prev_hist = prev.get("pretrain_history", []), prev.get("merger_history", [])
        args.prev_record = {k: prev.get(k) for k in ("command", "minutes", "merger_steps")}
        log("resumed vision tower + merger from the saved asset")
    else:
        hist1, heads = pretrain(tower, args.pretrain_minutes, args.seed, log)
    for p in tower.parameters():
        p.requires_grad_(False)
    merger = tower.merger
    if prev_hist is None:
        init_merger_from_heads(tower, heads, lm.get_input_embeddings().weight, tok, log)
    for p in merger.parameters():
        p.requires_grad_(True)
    # the frozen decoder inside the stock VL wrapper (M-RoPE positions from its get_rope_index)
    vl, _ = M.assemble("vl", lm.float(), tok)
    lm = vl
    for p in vl.parameters():
        p.requires_grad_(False)
    vl.model.language_model.to(torch.bfloat16)
    vl.lm_head.to(torch.bfloat16)
    rope_model = vl.model
    ip = image_processor()
    rng = random.Random(args.seed + 1 + (7 if prev_hist is not None else 0))
    lr = args.lr * 0.3
    opt = torch.optim.AdamW(merger.parameters(), lr=lr, weight_decay=0.0)
    for g in opt.param_groups:
        g["base"] = lr
    budget = args.minutes * 60
    t0, step, ema, hist = time.time(), 0, None, []
    step0 = prev_hist[-1]["step"] if prev_hist else 0
    bar = tqdm(total=int(budget), desc="vision merger", unit="s", mininterval=5)
    last = t0
    img_id = tok.convert_tokens_to_ids("<|image_pad|>")
    answer_cache = {}
    lm_inner = lm.model

    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, step, args.warmup, g["base"])
        pv, grid, qs, ans, _ = qa_batch(rng, args.batch * 2, ip, tok)
        with torch.no_grad():
            out = tower(pv, grid_thw=grid)
        h = out.last_hidden_state
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

        widx, _ = get_vision_window_index(grid, spatial_merge_size=tower.spatial_merge_size,
                                          window_size=tower.window_size, patch_size=tower.patch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img = merger(h)[torch.argsort(widx)]
        per = img.shape[0] // len(qs)
        embeds, tgts, ids_list = [], [], []
        for i, (q, a) in enumerate(zip(qs, ans)):
            ids = torch.tensor(prompt_ids(tok, q, per))
            if a not in answer_cache:
                answer_cache[a] = tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            t = answer_cache[a]
            full = torch.cat([ids, torch.tensor(t)])
            e = lm.get_input_embeddings()(full).clone()
            e[full == img_id] = img[i * per:(i + 1) * per].to(e.dtype)
            embeds.append(e)
            tgts.append(t)
            ids_list.append(full)
        pos = _positions(rope_model, ids_list, grid, img_id)
        loss = _lm_loss_pos(lm, embeds, tgts, pos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(merger.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        now = time.time()
        if int(now - last) >= 1:
            bar.update(int(now - last))
            last = now
        if step % 10 == 0:
            hist.append(dict(step=step0 + step, minutes=round((now - t0) / 60, 2), loss=round(ema, 4),
                             resumed=prev_hist is not None))
            log(f"merger step {step} {(now - t0) / 60:.1f} min loss(ema) {ema:.3f}")
        if step % 100 == 0:
            _save(tower, args, hist1, (prev_hist or []) + hist, step0 + step, t_start, save_fp16)
    bar.close()
    _save(tower, args, hist1, (prev_hist or []) + hist, step0 + step, t_start, save_fp16)
    log("vision done")


def _positions(rope_model, ids_list, grid, img_id):
    """[3, B, L] M-RoPE position ids of the right-padded batch (the VL model's own ``get_rope_index``)."""
    B = len(ids_list)
    L = max(len(x) for x in ids_list)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, x in enumerate(ids_list):
        ids[i, :len(x)] = x
        mask[i, :len(x)] = 1
    mm = (ids == img_id).int() * mask
    pos, _ = rope_model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=mask)
    return pos


def _lm_loss_pos(lm, embeds, targets, pos):
    B = len(embeds)
    L = max(e.shape[0] for e in embeds)
    x = embeds[0].new_zeros(B, L, embeds[0].shape[1])
    mask = torch.zeros(B, L, dtype=torch.long)
    rows, cols, labels = [], [], []
    for i, (e, t) in enumerate(zip(embeds, targets)):
        n = e.shape[0]
        x[i, :n] = e
        mask[i, :n] = 1
        for j, tid in enumerate(t):
            rows.append(i)
            cols.append(n - len(t) + j - 1)
            labels.append(tid)
    h = lm.model.language_model(inputs_embeds=x, attention_mask=mask, position_ids=pos).last_hidden_state
    logits = lm.lm_head(h[torch.tensor(rows), torch.tensor(cols)]).float()
    return F.cross_entropy(logits, torch.tensor(labels))


def _save(tower, args, hist1, hist2, step, t_start, save_fp16):
    sd = tower.state_dict()
    meta = dict(decoder=args.decoder, merger_steps=step, minutes=round((time.time() - t_start) / 60, 2),
                seed=args.seed, final_loss=hist2[-1]["loss"] if hist2 else None,
                pretrain_final=json.dumps(hist1[-1]) if hist1 else None, command=" ".join(sys.argv))
    prev = getattr(args, "prev_record", None)
    if prev:
        meta["command"] = f"{prev['command']}  THEN  {meta['command']}"
        meta["minutes"] = round(meta["minutes"] + (prev["minutes"] or 0), 2)
    save_fp16(sd, M.ASSETS / f"vision-{args.decoder}.safetensors", meta)
    (M.ASSETS / f"vision-{args.decoder}.json").write_text(
        json.dumps(dict(meta, pretrain_history=hist1, merger_history=hist2), indent=1))
