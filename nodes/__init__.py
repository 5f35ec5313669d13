"""ComfyUI side of the Sparge Attention pack (imports ComfyUI; sparge_core does not).

extension.py  SpargeExtension (node list, readout routes)
sparge_node.py  the "Sparge Attention" node (SpargeAttention)
override.py  the attention override + model wrappers installed on the model clone
config.py  widgets -> SpargeConfig (no ComfyUI imports)
readout.py  end-of-run readout: log line, "sparge.readout" event, GET /sparge/last_readout
calibrate_node.py  the "Sparge Calibrate" node (CalibrateOverride: observe during a normal run, write a profile)
profiles_nodes.py  models/sparge_profiles, the "Load Sparge Profile" node, profiles on the Sparge Attention node
error_check.py  the Sparge Attention node's error check (sparse vs dense per block) and extra readout keys
sparsity_map.py  the "Sparge Sparsity Map" node (pictures of the captured block masks)
sparsity_render.py  the pillow drawing of those pictures (no ComfyUI imports)
"""
