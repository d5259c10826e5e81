"""Training of the ternary network (PyTorch): quantisers, the tanh continuation, the network, data,
training, evaluation and export to the packed model file. Only this package imports torch."""
