"""torchrun (``torch.distributed.run``) as ``kiln train --nproc`` starts it: ``python -m kiln.training.torchrun``
takes torchrun's arguments and runs it unchanged, but a failed job ends with one line per failed worker (its rank
and exit status or signal), and a rendezvous that failed with one line, instead of torchrun's Python traceback
(and the C++ stack of each failed connection attempt, which its TCP store logs), so that the workers' own
``error: ...`` lines stay the message the user reads (kiln.training.distributed.launch ends with the first)."""

from __future__ import annotations

import os
import sys

QUIET = "KILN_TORCHRUN_QUIET"  # set by launch: TORCH_CPP_LOG_LEVEL=FATAL is for torchrun's own process only


def main() -> int:
    import torch  # noqa: F401  (reads TORCH_CPP_LOG_LEVEL once, here)

    if os.environ.pop(QUIET, None):  # the workers torchrun starts log C++ warnings and errors as usual
        os.environ.pop("TORCH_CPP_LOG_LEVEL", None)
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except (DistNetworkError, RendezvousError) as e:  # the machines did not meet (launch names the endpoint)
        print(f"torchrun: {type(e).__name__}: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    except ChildFailedError as e:
        for rank, failure in sorted(e.failures.items()):
            how = (f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}")
            print(f"torchrun: worker rank {rank} (local rank {failure.local_rank}) ended with {how}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
