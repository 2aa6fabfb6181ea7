"""Quantization: pure primitives, quantizer modules, model wrapping."""
