"""MEAMT-Net liver tumour bundle: network, evidential heads, slice-wise inference, data and training helpers."""
