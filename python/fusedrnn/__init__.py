"""fusedrnn: fused LSTM/GRU/RNN kernels for PyTorch, as drop-in torch.nn modules."""
__version__ = "0.1.0"
