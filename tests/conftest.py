import torch


def pytest_configure(config):
    # Two cores: keep intra-op threads fixed so test timings and results are reproducible.
    torch.set_num_threads(2)
