"""Opening image datasets (sources) and decoding them once to uint8 tensors (store)."""
