"""torchrun entry for tests/test_scale_bad_input.py: the CLI, where rank 1 dies (os._exit(3), as a kill or an
out-of-memory would end it) at its second collective, in the middle of the layer walk."""
import os
import sys

from mmcompress import cli, distributed

if os.environ.get("RANK") == "1":
    calls = [0]
    real = distributed.World._collective

    def dying(self, t, op):
        calls[0] += 1
        if calls[0] == 2:
            print("rank 1: dying now", file=sys.stderr, flush=True)
            os._exit(3)
        return real(self, t, op)

    distributed.World._collective = dying
sys.exit(cli.main(sys.argv[1:]))
