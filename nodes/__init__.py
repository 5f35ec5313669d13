"""ComfyUI side of the Sparge Attention pack (imports ComfyUI; sparge_core does not).

extension.py  SpargeExtension (node list, readout routes)
sparge_node.py  the "Sparge Attention" node (SpargeAttention)
override.py  the attention override + model wrappers installed on the model clone
config.py  widgets -> SpargeConfig (no ComfyUI imports)
readout.py  end-of-run readout: log line, "sparge.readout" event, GET /sparge/last_readout
"""
