"""Suite-wide settings.

The test models are tiny, and on a small machine several intra-op threads per process cost far
more in synchronisation than they gain (tens of times slower when the cores are shared), so
every test process, and every process a test starts, uses one thread.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

torch.set_num_threads(1)
