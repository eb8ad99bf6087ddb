"""An independent float64 numpy LSTM used as the reference for the LSTM families' tests."""

import numpy as np


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference_lstm(x, w_ih, b, w_hh):
    """Plain float64 LSTM cell loop, gates [i, f, g, o]: x [L, D] -> hidden states [L, H]."""
    hidden = w_hh.shape[0]
    h, c, out = np.zeros(hidden), np.zeros(hidden), []
    for x_t in x:
        z = x_t @ w_ih + b + h @ w_hh
        i, f, g, o = (z[k * hidden:(k + 1) * hidden] for k in range(4))
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        out.append(h)
    return np.array(out, np.float64).reshape(len(x), hidden)
