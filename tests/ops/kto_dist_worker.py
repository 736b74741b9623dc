"""One of the 2 gloo ranks of test_kto.py's distributed test (launched as a script):

    python kto_dist_worker.py INIT_FILE RANK OUT

Both ranks build the same global data from one seed and take uneven shares of it (rank 0: 3
examples and KL estimates 0-4, rank 1: 6 examples and estimates 5-6), then save kto_loss's z0,
loss (sum) and gradient, and kto_reference_point's z0 for a few other splits.
"""
import sys

import torch
import torch.distributed as dist

import pyalign
from pyalign.ops.kto import kto_reference_point


def main() -> int:
    init_file, rank, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    ref = -20 - 60 * torch.rand(9)
    data = {"ref": ref, "policy": ref + 3 * torch.randn(9),
            "desirable": torch.tensor([True, False, True, True, False, False, True, False, True]),
            "kl": torch.cat([0.2 + 0.3 * torch.randn(5), 2.0 + 0.3 * torch.randn(2)]),
            "rows": [(0, 3), (3, 9)]}
    rows, kl_rows = slice(*data["rows"][rank]), [slice(0, 5), slice(5, 7)][rank]
    policy = data["policy"][rows].clone().requires_grad_(True)
    out_kto = pyalign.kto_loss(policy, data["ref"][rows], data["desirable"][rows], data["kl"][kl_rows],
                               beta=0.4, reduction="sum")
    out_kto.loss.backward()
    group = dist.new_group([0, 1])
    result = {
        "data": data, "z0": out_kto.kl, "loss": out_kto.loss.detach(), "grad": policy.grad,
        "z0_group": kto_reference_point(data["kl"][kl_rows], process_group=group),
        # rank 1 without any estimate: the mean of rank 0's
        "z0_one_rank_empty": kto_reference_point(data["kl"][:5] if rank == 0 else torch.empty(0)),
        # one 0-d estimate per rank (a rank's mean, as TRL gathers it): the mean of the means
        "z0_of_means": kto_reference_point(data["kl"][kl_rows].mean()),
    }
    torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
