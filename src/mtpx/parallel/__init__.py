"""One model over several processes (ranks), on torch.distributed: NCCL between GPUs, gloo between CPU processes.

- config.py: ParallelConfig (tensor-parallel size or layer-split stages), checked against the model before loading;
- group.py: the ranks' process group, the collectives the sharded model calls (timed for the bench), the channel
  rank 0 sends its engine calls on, and the watch on the other ranks' processes;
- launch.py: starting the ranks (worker processes spawned here, or torchrun's);
- mirror.py: rank 0's engine tells every call that changes a sequence to the other ranks, whose engines repeat it,
  so every rank runs the same passes in the same order (the sharded model's collectives then always match).
How a rank's shard is cut and where its collectives go is runners/distributed.py's business.
"""
from mtpx.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]
