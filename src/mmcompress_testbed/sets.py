"""The testbed's named data sets, registered with :mod:`mmcompress.data.named`: ``--calib wiki|testbed``,
``--ppl wiki|shakespeare``, ``--asr speech-test[-digits|-sentences]``, ``--vqa image-qa-test``."""

from __future__ import annotations

from functools import partial

from mmcompress.data import named

from . import data, mm_data  # data registers the --calib names itself (data.register_calibration)

for _name in data.EVAL_SETS:
    named.register("text", _name, partial(data.eval_text, _name))
for _name in mm_data.SPEECH_SETS:
    named.register("speech", _name, partial(mm_data.speech_test, _name))
named.register("vqa", "image-qa-test", partial(mm_data.image_qa_test, "image-qa-test"))
