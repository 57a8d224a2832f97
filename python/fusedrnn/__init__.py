"""fusedrnn: fused LSTM/GRU/RNN kernels for PyTorch, as drop-in torch.nn modules.

    import fusedrnn
    lstm = fusedrnn.LSTM(input_size=32, hidden_size=64, num_layers=2, bidirectional=True)
    output, (h_n, c_n) = lstm(x)          # exactly torch.nn.LSTM's contract

`fusedrnn.reference` is the plain-PyTorch oracle; `fusedrnn.functional.rnn` the functional form.
`fusedrnn.from_torch_nn(model)` swaps the torch.nn RNNs inside a model you did not write for
fusedrnn's (`to_torch_nn` swaps them back).
"""
__version__ = "0.1.0"

from . import functional, reference
from .cell_modules import GRUCell, LSTMCell, RNNCell, RNNCellBase
from .convert import from_torch_nn, to_torch_nn
from .modules import GRU, LSTM, RNN, RNNBase

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "RNNBase", "RNNCellBase",
           "from_torch_nn", "to_torch_nn", "functional", "reference", "__version__"]
