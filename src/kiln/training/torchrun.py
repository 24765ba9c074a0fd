"""torchrun (``torch.distributed.run``) as ``kiln train --nproc`` starts it: ``python -m kiln.training.torchrun``
takes torchrun's arguments and runs it unchanged, but a failed job ends with one line per failed worker (its rank
and exit status or signal) instead of torchrun's Python traceback, so that the workers' own ``error: ...`` lines
stay the message the user reads (kiln.training.distributed.launch ends with the first of them)."""

from __future__ import annotations

import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except ChildFailedError as e:
        for rank, failure in sorted(e.failures.items()):
            how = (f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}")
            print(f"torchrun: worker rank {rank} (local rank {failure.local_rank}) ended with {how}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
