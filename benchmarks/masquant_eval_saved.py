"""Evaluate a saved omni-mini model as masquant_table.py does (wiki ppl on 4 x 1024 tokens, multiple-choice image QA on
10 questions per type), but with digit WER on all 50 clips and its substitution / deletion / insertion split.

Usage: python benchmarks/masquant_eval_saved.py OUTPUT_DIR_OF_MMCOMPRESS_QUANTIZE  (prints one JSON line)"""
import json, sys
import torch
from mmcompress.export.serialization import load
from mmcompress.eval.asr import word_error_rate
from mmcompress.eval.perplexity import text_perplexity
from mmcompress.eval.vqa import choice_accuracy
from mmcompress.models.loading import load_tokenizer
from mmcompress.models.processing import load_processor
from mmcompress_testbed.data import eval_text
torch.set_num_threads(1)
m = load(sys.argv[1]); src = getattr(m, "_mmcompress_source", None) or sys.argv[1]
tok, proc = load_tokenizer(src), load_processor(src)
ppl = text_perplexity(m, tok, eval_text("wiki"), seqlen=1024, max_windows=4, progress=False)["ppl"]
asr = word_error_rate(m, proc, "speech-test", kinds=("digits",), max_new_tokens=16)
ch = choice_accuracy(m, proc, "image-qa-test", limit_per_type=10)
print(json.dumps({"model": sys.argv[1], "ppl": ppl, "wer_digits50": asr["wer_digits"], "errors": asr["errors_digits"],
                  "choice": ch["accuracy"]}))
