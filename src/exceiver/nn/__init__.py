"""The network: architecture and objective configs, presets, attention blocks, the Perceiver IO
module, the pretraining objectives, and the import of the original release's checkpoints."""
