"""Group's collectives over 3 gloo processes (the path for more than two ranks: gathered, added in rank order) and
rank 0's command channel."""
import json
import os
import subprocess
import sys
import textwrap

RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys, datetime
    import torch, torch.distributed as dist
    from mtpx.parallel.group import Group
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=world)
    group = Group(rank, world, torch.device("cpu"), store)
    def part(r):  # rank r's partial sums: magnitudes far apart, so the order of the additions shows in the bits
        g = torch.Generator().manual_seed(r)
        return (torch.randn(6, 64, generator=g) * 10 ** torch.randn(6, 64, generator=g)).bfloat16()
    x = part(rank)
    whole = group.reduce_sum(x.clone())
    rows = torch.cat([group.reduce_sum(x[i:i + 1].clone()) for i in range(6)])
    in_order = part(0) + part(1) + part(2)
    gathered = group.gather_last(x[:, :8].clone())
    if rank == 0:
        for i in range(3):
            group.tell(("call", i))
        group.tell(("stop",))
        heard = []
    else:
        heard = [group.listen() for _ in range(4)]
    dist.barrier()
    print(json.dumps({"rows_equal_whole": torch.equal(whole, rows), "in_rank_order": torch.equal(whole, in_order),
                      "sum": whole.float().sum().item(),
                      "gathered": list(gathered.shape), "heard": heard, "calls": group.stats.calls}))
    dist.destroy_process_group()
""")


def test_three_ranks_sum_every_row_alike_and_hear_rank_0_in_order():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), "3", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(3)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert all(o["rows_equal_whole"] and o["in_rank_order"] for o in outs)  # a row's sum does not depend on how many rows went with it
    assert len({o["sum"] for o in outs}) == 1  # every rank holds the same sums
    assert all(o["gathered"] == [6, 24] for o in outs)
    assert outs[1]["heard"] == outs[2]["heard"] == [["call", 0], ["call", 1], ["call", 2], ["stop"]]
