"""One training process for tests/test_train.py, started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py <train.py arguments>

trains as train.py does and then saves this process's final weights to OUT/rank<RANK>.pth.
"""

import os
import sys


def main():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
    import torch

    import train

    args = train.parse_args(sys.argv[1:])
    model = train.train(args)
    torch.save(model.state_dict(), os.path.join(args.out, f"rank{os.environ['RANK']}.pth"))


if __name__ == "__main__":
    main()
