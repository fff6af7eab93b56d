"""Fine-tuning: LoRA SFT and DPO on ember's own model code (ember.tune.trainer), its data (ember.tune.data).

Import-light on purpose: nothing here imports torch; import the submodules you need.
"""
