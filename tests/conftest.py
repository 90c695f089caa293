"""Test settings: one CPU thread per test process.

The models under test are tiny, so intra-op threads buy little, and on a shared
2-core machine a second busy-waiting thread can make small ops ten times slower.
"""

import torch

torch.set_num_threads(1)
