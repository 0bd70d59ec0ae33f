"""Suite-wide settings: one torch thread, so parallel jobs on a 2-core machine don't thrash."""

import torch

torch.set_num_threads(1)
