import torch

# Two threads match the CI machine; results must not depend on it, timings are only taken in benchmarks/.
torch.set_num_threads(2)
