"""ComfyUI side of the Sparge Attention pack (imports ComfyUI; sparge_core does not).

Dependencies point one way, from the nodes down to the plain modules (tests/test_architecture.py):

  extension.py       SpargeExtension: the node list, the HTTP routes
  sparge_node.py     the "Sparge Attention" node          -> install, profile_files, profile_node
  calibrate_node.py  the "Sparge Calibrate" node          -> install, calibration
  profile_node.py    the "Load Sparge Profile" node (SPARGE_PROFILE type) -> profile_files
  sparsity_map.py    the "Sparge Sparsity Map" node       -> install, sparsity_views
  install.py         puts the override on a model clone, finds it again
  override.py        the attention override + model wrappers installed on a model clone
  eligibility.py     which calls run sparse (dense reasons, key padding, token grid, block index)
  sparse_call.py     the sparse call (a replay of its CUDA graph, or sparge_core.torch_op.call over the kept keys)
  observers.py       the interface features plug into the override with
  adapt.py           observer: holds the error target (measures sampled rows, moves minshare per block)
  error_check.py     observer: the error check (sparse vs dense per block)
  profile_use.py     observer: a loaded profile's notes and readout
  calibration.py     observer: the Sparge Calibrate node's measurement and profile writing
  stats.py           declared per-call / forward / step / run records, and their folding
  capture.py         the sparsity-map capture (packed block masks)
  readout.py         the end-of-run readout dict and its log line
  routes.py          where readouts go: log, "sparge.readout" event, GET /sparge/*
  config.py          widgets -> SpargeConfig, the preset table for the browser
  model_info.py      what is read off ComfyUI's model and sampling state
  profile_files.py   models/sparge_profiles, reading and fitting a profile
  sparsity_views.py  captured map -> pictures;  sparsity_render.py  the pillow drawing
"""
