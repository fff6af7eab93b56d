"""What a setting (quantization, dtype) costs in output quality, measured against the float32 reference."""

from ember.quality.fidelity import Fidelity, Reference, measure, reference

__all__ = ["Fidelity", "Reference", "measure", "reference"]
